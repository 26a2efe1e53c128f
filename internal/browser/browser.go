// Package browser drives a headless Chromium for tests that must see a page
// as a person does: the DOM after the page loaded, and a screenshot, with
// JavaScript on or off.
//
// It speaks the DevTools protocol over a pipe (--remote-debugging-pipe):
// the command-line shortcuts --dump-dom and --screenshot print nothing once
// scripts are disabled, and the protocol disables only the page's scripts.
package browser

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/testenv"
)

// Binary is the Chromium program, Debian's package "chromium".
const Binary = "chromium"

// Need returns Chromium's path, or skips t (fails it under CI=true) when it
// is not installed.
func Need(t testing.TB) string {
	t.Helper()
	return testenv.LookPath(t, Binary, "chromium")
}

// DumpDOM loads url in a 1280×2000 window and returns the DOM as HTML once
// the page loaded (and, with js, its scripts ran for a moment).
func DumpDOM(ctx context.Context, url string, js bool) (string, error) {
	return DumpDOMIn(ctx, "", url, js)
}

// DumpDOMIn is DumpDOM with Chromium run inside the network namespace netns
// (empty: this process's), for pages only that namespace reaches.
func DumpDOMIn(ctx context.Context, netns, url string, js bool) (string, error) {
	dom, _, err := visit(ctx, netns, url, 1280, 2000, js, true, false)
	return dom, err
}

// Screenshot loads url in a window width×height and writes a PNG of the
// window to file.
func Screenshot(ctx context.Context, url, file string, width, height int, js bool) error {
	return ScreenshotIn(ctx, "", url, file, width, height, js)
}

// ScreenshotIn is Screenshot with Chromium run inside netns (see DumpDOMIn).
func ScreenshotIn(ctx context.Context, netns, url, file string, width, height int, js bool) error {
	_, png, err := visit(ctx, netns, url, width, height, js, false, true)
	if err != nil {
		return err
	}
	return os.WriteFile(file, png, 0o644)
}

// settle is how long scripts run after the load event before the DOM or
// the picture is taken.
const settle = 500 * time.Millisecond

func visit(ctx context.Context, netns, url string, width, height int, js, dom, shot bool) (string, []byte, error) {
	c, err := start(ctx, netns)
	if err != nil {
		return "", nil, err
	}
	defer c.close()

	var target struct {
		TargetID string `json:"targetId"`
	}
	if err := c.call(ctx, "", "Target.createTarget", map[string]any{"url": "about:blank"}, &target); err != nil {
		return "", nil, err
	}
	var attached struct {
		SessionID string `json:"sessionId"`
	}
	if err := c.call(ctx, "", "Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true}, &attached); err != nil {
		return "", nil, err
	}
	s := attached.SessionID
	steps := []struct {
		method string
		params map[string]any
	}{
		{"Page.enable", nil},
		{"Emulation.setDeviceMetricsOverride", map[string]any{"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}},
		{"Emulation.setScriptExecutionDisabled", map[string]any{"value": !js}},
	}
	for _, st := range steps {
		if err := c.call(ctx, s, st.method, st.params, nil); err != nil {
			return "", nil, err
		}
	}
	loaded := c.await("Page.loadEventFired", s)
	var nav struct {
		ErrorText string `json:"errorText"`
	}
	if err := c.call(ctx, s, "Page.navigate", map[string]any{"url": url}, &nav); err != nil {
		return "", nil, err
	}
	if nav.ErrorText != "" {
		return "", nil, fmt.Errorf("%s: navigating to %s: %s", Binary, url, nav.ErrorText)
	}
	select {
	case <-loaded:
	case <-c.dead:
		return "", nil, c.deadErr()
	case <-ctx.Done():
		return "", nil, fmt.Errorf("%s: waiting for %s to load: %w", Binary, url, ctx.Err())
	}
	select {
	case <-time.After(settle):
	case <-ctx.Done():
		return "", nil, ctx.Err()
	}
	var html string
	if dom {
		var ev struct {
			Result struct {
				Value string `json:"value"`
			} `json:"result"`
		}
		if err := c.call(ctx, s, "Runtime.evaluate", map[string]any{"expression": "document.documentElement.outerHTML", "returnByValue": true}, &ev); err != nil {
			return "", nil, err
		}
		if ev.Result.Value == "" {
			return "", nil, errors.New(Binary + " returned an empty DOM")
		}
		html = ev.Result.Value
	}
	var png []byte
	if shot {
		var sc struct {
			Data string `json:"data"`
		}
		if err := c.call(ctx, s, "Page.captureScreenshot", map[string]any{"format": "png"}, &sc); err != nil {
			return "", nil, err
		}
		if png, err = base64.StdEncoding.DecodeString(sc.Data); err != nil || len(png) == 0 {
			return "", nil, fmt.Errorf("%s: bad screenshot data: %v", Binary, err)
		}
	}
	return html, png, nil
}

// conn is one Chromium process and its DevTools pipe.
type conn struct {
	cmd     *exec.Cmd
	in      *os.File // commands, Chromium's fd 3
	out     *os.File // answers and events, Chromium's fd 4
	profile string
	stderr  syncBuffer

	mu      sync.Mutex
	next    int
	waiting map[int]chan message
	events  []waiter
	dead    chan struct{} // closed when the pipe ends
	err     error
}

type waiter struct {
	method, session string
	ch              chan struct{}
}

type message struct {
	ID        int             `json:"id,omitempty"`
	Method    string          `json:"method,omitempty"`
	Params    any             `json:"params,omitempty"`
	SessionID string          `json:"sessionId,omitempty"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error,omitempty"`
}

func start(ctx context.Context, netns string) (*conn, error) {
	bin, err := exec.LookPath(Binary)
	if err != nil {
		return nil, fmt.Errorf("%s not installed: %w", Binary, err)
	}
	profile, err := os.MkdirTemp("", "peerd-browser-")
	if err != nil {
		return nil, err
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	// No sandbox: it needs user namespaces that root and containers often
	// lack. A fresh profile per run keeps runs apart and leaves nothing.
	c := &conn{in: inW, out: outR, profile: profile, waiting: map[int]chan message{}, dead: make(chan struct{})}
	args := []string{bin,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--no-first-run", "--no-default-browser-check", "--disable-extensions",
		"--disable-background-networking", "--disable-sync", "--hide-scrollbars",
		"--remote-debugging-pipe", "--user-data-dir=" + profile, "about:blank"}
	if netns != "" {
		// ip netns exec keeps the pipe's descriptors (3 and 4) open.
		args = append([]string{"ip", "netns", "exec", netns}, args...)
	}
	c.cmd = exec.CommandContext(ctx, args[0], args[1:]...)
	c.cmd.ExtraFiles = []*os.File{inR, outW}
	c.cmd.Stderr = &c.stderr
	c.cmd.WaitDelay = 5 * time.Second
	if err := c.cmd.Start(); err != nil {
		os.RemoveAll(profile)
		return nil, fmt.Errorf("%s: %w", Binary, err)
	}
	inR.Close()
	outW.Close()
	go c.read()
	return c, nil
}

func (c *conn) read() {
	r := bufio.NewReader(c.out)
	for {
		b, err := r.ReadBytes(0)
		if err != nil {
			c.mu.Lock()
			c.err = fmt.Errorf("%s closed its DevTools pipe: %v; stderr: %s", Binary, err, lastLines(c.stderr.String(), 5))
			c.mu.Unlock()
			close(c.dead)
			return
		}
		var m message
		if json.Unmarshal(b[:len(b)-1], &m) != nil {
			continue
		}
		c.mu.Lock()
		if m.ID != 0 {
			if ch, ok := c.waiting[m.ID]; ok {
				delete(c.waiting, m.ID)
				ch <- m
			}
		} else {
			kept := c.events[:0]
			for _, w := range c.events {
				if w.method == m.Method && w.session == m.SessionID {
					close(w.ch)
				} else {
					kept = append(kept, w)
				}
			}
			c.events = kept
		}
		c.mu.Unlock()
	}
}

func (c *conn) deadErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// await returns a channel closed on the next event method of session.
func (c *conn) await(method, session string) <-chan struct{} {
	ch := make(chan struct{})
	c.mu.Lock()
	c.events = append(c.events, waiter{method, session, ch})
	c.mu.Unlock()
	return ch
}

// call sends one command and decodes its result into res (if not nil).
func (c *conn) call(ctx context.Context, session, method string, params map[string]any, res any) error {
	ch := make(chan message, 1)
	c.mu.Lock()
	c.next++
	id := c.next
	c.waiting[id] = ch
	c.mu.Unlock()
	if params == nil {
		params = map[string]any{}
	}
	b, err := json.Marshal(message{ID: id, Method: method, Params: params, SessionID: session})
	if err != nil {
		return err
	}
	if _, err := c.in.Write(append(b, 0)); err != nil {
		return fmt.Errorf("%s %s: %w", Binary, method, err)
	}
	select {
	case m := <-ch:
		if m.Error != nil {
			return fmt.Errorf("%s %s: %s (%d)", Binary, method, m.Error.Message, m.Error.Code)
		}
		if res != nil {
			return json.Unmarshal(m.Result, res)
		}
		return nil
	case <-c.dead:
		return c.deadErr()
	case <-ctx.Done():
		return fmt.Errorf("%s %s: %w", Binary, method, ctx.Err())
	}
}

// close asks Chromium to quit, then kills it if it lingers.
func (c *conn) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c.call(ctx, "", "Browser.close", nil, nil)
	c.in.Close()
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		c.cmd.Process.Kill()
		<-done
	}
	c.out.Close()
	os.RemoveAll(c.profile)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// syncBuffer collects Chromium's stderr, written by exec's copying goroutine
// while read may look at it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
