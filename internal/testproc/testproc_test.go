package testproc

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The processes here are sh one-liners; every wait is bounded by a
// deadline far beyond what it needs, so only a hang reaches it.
const patience = 30 * time.Second

func startSh(t *testing.T, script string, leader bool) *Proc {
	t.Helper()
	p, err := Start(Spec{Name: "sh", Args: []string{"sh", "-c", script}, Log: filepath.Join(t.TempDir(), "sh.log"), TermLeader: leader})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	return p
}

// waitLog waits until the process's log holds want, so a test acts only
// once the script reached that point (a trap installed, a child started).
func waitLog(t *testing.T, p *Proc, want string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	var log string
	err := Poll(ctx, 10*time.Millisecond, p.Done(), func(context.Context) error {
		b, _ := os.ReadFile(p.Log)
		if log = string(b); !strings.Contains(log, want) {
			return fmt.Errorf("log %q lacks %q", log, want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return log
}

func exitStatus(t *testing.T, err error) syscall.WaitStatus {
	t.Helper()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("exit error %v (%T), want an *exec.ExitError", err, err)
	}
	return ee.Sys().(syscall.WaitStatus)
}

// gone reports whether pid has exited (reaped, or a zombie its new parent
// has yet to reap).
func gone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && strings.HasPrefix(s[i+1:], " Z")
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(patience)
	for !gone(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("process %d still runs", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestProcessThatExits(t *testing.T) {
	p := startSh(t, "echo to-stdout; echo to-stderr >&2; exit 3", false)
	select {
	case <-p.Done():
	case <-time.After(patience):
		t.Fatal("the process did not exit")
	}
	if p.Running() {
		t.Error("Running after Done closed")
	}
	if st := exitStatus(t, p.Err()); st.ExitStatus() != 3 {
		t.Errorf("exit status %d, want 3", st.ExitStatus())
	}
	if got := p.Tail(10); got != "to-stdout\nto-stderr" {
		t.Errorf("log %q: want both streams in order", got)
	}
	if p.Stop(time.Millisecond) {
		t.Error("Stop of an exited process says it killed it")
	}
	if st := exitStatus(t, p.Err()); st.ExitStatus() != 3 {
		t.Errorf("Stop of an exited process changed its exit status to %v", st)
	}
}

func TestStopTerminatesTheGroup(t *testing.T) {
	p := startSh(t, "sleep 600 & echo child=$!; wait", false)
	log := waitLog(t, p, "\n")
	child, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(log, "child=")))
	if err != nil {
		t.Fatalf("log %q: %v", log, err)
	}
	if p.Stop(patience) {
		t.Fatal("a shell that honours SIGTERM needed SIGKILL")
	}
	if st := exitStatus(t, p.Err()); !st.Signaled() || st.Signal() != syscall.SIGTERM {
		t.Errorf("exit %v, want death by SIGTERM", st)
	}
	waitGone(t, child)
}

func TestStopKillsWhatIgnoresSIGTERM(t *testing.T) {
	// An ignored signal stays ignored across fork and exec: sleep ignores
	// it too.
	p := startSh(t, `trap "" TERM; sleep 600 & echo child=$!; wait`, false)
	log := waitLog(t, p, "\n")
	child, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(log, "child=")))
	if err != nil {
		t.Fatalf("log %q: %v", log, err)
	}
	if !p.Stop(100 * time.Millisecond) {
		t.Fatal("Stop says SIGTERM was enough for a process that ignores it")
	}
	if p.Running() {
		t.Fatal("Stop returned before the process was reaped")
	}
	if st := exitStatus(t, p.Err()); !st.Signaled() || st.Signal() != syscall.SIGKILL {
		t.Errorf("exit %v, want death by SIGKILL", st)
	}
	waitGone(t, child)
}

func TestTermLeaderSparesTheGroup(t *testing.T) {
	p := startSh(t, "sleep 600 & echo child=$!; wait", true)
	log := waitLog(t, p, "\n")
	child, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(log, "child=")))
	if err != nil {
		t.Fatalf("log %q: %v", log, err)
	}
	pgid := p.PID()
	t.Cleanup(func() { syscall.Kill(-pgid, syscall.SIGKILL) })
	if p.Stop(patience) {
		t.Fatal("a shell that honours SIGTERM needed SIGKILL")
	}
	if gone(child) {
		t.Fatal("SIGTERM for the leader alone reached its child")
	}
}

func TestKill(t *testing.T) {
	p := startSh(t, `trap "" TERM; echo ready; sleep 600`, false)
	waitLog(t, p, "ready")
	p.Kill()
	if p.Running() {
		t.Fatal("running after Kill")
	}
	if st := exitStatus(t, p.Err()); !st.Signaled() || st.Signal() != syscall.SIGKILL {
		t.Errorf("exit %v, want death by SIGKILL", st)
	}
}

func TestNilProc(t *testing.T) {
	var p *Proc
	if p.Running() || p.Stop(time.Second) || p.Err() != nil || p.Done() != nil {
		t.Fatal("a nil Proc is not an idle one")
	}
	p.Kill()
}

func TestLogAppendsOrTruncates(t *testing.T) {
	log := filepath.Join(t.TempDir(), "x.log")
	for i, trunc := range []bool{false, false, true} {
		p, err := Start(Spec{Name: "echo", Args: []string{"sh", "-c", "echo run" + strconv.Itoa(i)}, Log: log, Truncate: trunc})
		if err != nil {
			t.Fatal(err)
		}
		<-p.Done()
	}
	if got := Tail(log, 10); got != "run2" {
		t.Errorf("after two appends and a truncation: %q", got)
	}
	p, err := Start(Spec{Name: "echo", Args: []string{"sh", "-c", "echo again"}, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	<-p.Done()
	if got := Tail(log, 10); got != "run2\nagain" {
		t.Errorf("an append lost the earlier run: %q", got)
	}
}

func TestStartErrors(t *testing.T) {
	dir := t.TempDir()
	for _, s := range []Spec{
		{Name: "none", Log: filepath.Join(dir, "a.log")},
		{Name: "nolog", Args: []string{"true"}},
		{Name: "missing", Args: []string{filepath.Join(dir, "no-such-program")}, Log: filepath.Join(dir, "b.log")},
		{Name: "badlog", Args: []string{"true"}, Log: filepath.Join(dir, "no-such-dir", "c.log")},
	} {
		p, err := Start(s)
		if err == nil {
			p.Kill()
			t.Errorf("%s: started", s.Name)
			continue
		}
		if !strings.Contains(err.Error(), s.Name) {
			t.Errorf("%s: error %q does not name the process", s.Name, err)
		}
	}
}

func TestEnv(t *testing.T) {
	log := filepath.Join(t.TempDir(), "env.log")
	p, err := Start(Spec{Name: "env", Args: []string{"/bin/sh", "-c", `echo "[$TESTPROC_X]"`}, Log: log, Env: []string{"TESTPROC_X=set"}})
	if err != nil {
		t.Fatal(err)
	}
	<-p.Done()
	if got := Tail(log, 1); got != "[set]" {
		t.Errorf("env not passed: %q", got)
	}
}

func writeLines(t *testing.T, n int, trailer string) string {
	t.Helper()
	var b strings.Builder
	for i := 1; i <= n; i++ {
		fmt.Fprintf(&b, "line %d\n", i)
	}
	b.WriteString(trailer)
	p := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestTail(t *testing.T) {
	short := writeLines(t, 3, "")
	if got := Tail(short, 10); got != "line 1\nline 2\nline 3" {
		t.Errorf("short file: %q", got)
	}
	if got := Tail(short, 2); got != "line 2\nline 3" {
		t.Errorf("short file, 2 lines: %q", got)
	}
	// Many 64 KiB blocks, with blank lines at the end to skip.
	long := writeLines(t, 200000, "\n\n\n")
	if got := Tail(long, 3); got != "line 199998\nline 199999\nline 200000" {
		t.Errorf("long file: %q", got)
	}
	// n lines that span a block boundary.
	if got := Tail(long, 9000); !strings.HasPrefix(got, "line 191001\n") || strings.Count(got, "\n") != 8999 {
		t.Errorf("long file, 9000 lines: %d lines starting %q", strings.Count(got, "\n")+1, got[:min(len(got), 20)])
	}
	// The last line has no newline.
	noNL := writeLines(t, 5, "partial")
	if got := Tail(noNL, 2); got != "line 5\npartial" {
		t.Errorf("last line without newline: %q", got)
	}
	empty := writeLines(t, 0, "")
	if got := Tail(empty, 5); got != "" {
		t.Errorf("empty file: %q", got)
	}
	if got := Tail(filepath.Join(t.TempDir(), "none"), 5); !strings.HasPrefix(got, "(") || !strings.Contains(got, "no such file") {
		t.Errorf("missing file: %q", got)
	}
	// One endless line: bounded, and its end is what is shown.
	huge := filepath.Join(t.TempDir(), "huge")
	if err := os.WriteFile(huge, []byte(strings.Repeat("x", 3*tailMax)+"END\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := Tail(huge, 2); len(got) > tailMax+64<<10 || !strings.HasSuffix(got, "xEND") {
		t.Errorf("endless line: %d bytes, ends %q", len(got), got[max(0, len(got)-8):])
	}
}

// TestTailMatchesLastLines compares Tail, which reads blocks from the end,
// with LastLines over the whole file, for every n around block boundaries.
func TestTailMatchesLastLines(t *testing.T) {
	var b strings.Builder
	for i := range 40 {
		// Lines of 0 to 13 KiB: a block holds a handful, and some end
		// right at a block boundary.
		b.WriteString(strings.Repeat(strconv.Itoa(i%10), (i*7919)%(13<<10)))
		b.WriteString("\n")
	}
	whole := b.String()
	p := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(p, []byte(whole), 0o644); err != nil {
		t.Fatal(err)
	}
	for n := 0; n <= 42; n++ {
		if got, want := Tail(p, n), LastLines(whole, n); got != want {
			t.Errorf("Tail(%d): %d bytes, LastLines: %d bytes", n, len(got), len(want))
		}
	}
}

func TestLastLines(t *testing.T) {
	for _, c := range []struct {
		in   string
		n    int
		want string
	}{
		{"a\nb\nc\n", 2, "b\nc"},
		{"a\nb\nc", 5, "a\nb\nc"},
		{"a\n\n\n", 1, "a"},
		{"", 3, ""},
		{"a\nb", 0, ""},
	} {
		if got := LastLines(c.in, c.n); got != c.want {
			t.Errorf("LastLines(%q, %d) = %q, want %q", c.in, c.n, got, c.want)
		}
	}
}

// closedPort is a loopback port that had a listener a moment ago and has
// none now: a dial gets connection refused.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestWaitTCP(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := WaitTCP(ctx, closedPort(t), nil)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "refused") {
		t.Errorf("no listener: %v, want the deadline with the last dial error", err)
	}

	exited := make(chan struct{})
	close(exited)
	ctx, cancel = context.WithTimeout(context.Background(), patience)
	defer cancel()
	err = WaitTCP(ctx, closedPort(t), exited)
	if !errors.Is(err, ErrExited) {
		t.Errorf("exited process: %v", err)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel = context.WithTimeout(context.Background(), patience)
	defer cancel()
	if err := WaitTCP(ctx, ln.Addr().String(), nil); err != nil {
		t.Errorf("listening port: %v", err)
	}
}

func TestWaitUnix(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := WaitUnix(ctx, sock, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("no socket: %v", err)
	}
	// The socket appears while the wait runs.
	result := make(chan error, 1)
	ctx, cancel = context.WithTimeout(context.Background(), patience)
	defer cancel()
	go func() { result <- WaitUnix(ctx, sock, nil) }()
	time.Sleep(100 * time.Millisecond)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := <-result; err != nil {
		t.Errorf("socket that came up: %v", err)
	}
}

func TestHTTPOK(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) < 3 {
			http.Error(w, "starting", http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	ready := HTTPOK(nil, srv.URL)
	if err := ready(context.Background()); err == nil || !strings.Contains(err.Error(), "503") {
		t.Errorf("503: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	if err := Poll(ctx, 10*time.Millisecond, nil, ready); err != nil {
		t.Errorf("server that becomes ready: %v", err)
	}
	if n := calls.Load(); n != 3 {
		t.Errorf("%d requests, want 3 (two 503s, then 200)", n)
	}
}

func TestPollStopsWhenTheProcessExits(t *testing.T) {
	p := startSh(t, "exit 0", false)
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	err := Poll(ctx, 10*time.Millisecond, p.Done(), func(context.Context) error { return errors.New("never ready") })
	if !errors.Is(err, ErrExited) || !strings.Contains(err.Error(), "never ready") {
		t.Errorf("Poll over an exited process: %v", err)
	}
}

func TestFreePort(t *testing.T) {
	seen := map[int]bool{}
	for range 50 {
		port, err := FreePort("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		if seen[port] {
			t.Fatalf("port %d handed out twice", port)
		}
		seen[port] = true
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			t.Fatalf("port %d is not free: %v", port, err)
		}
		ln.Close()
	}
}

// fixedListener is a listener on a port the test chose.
type fixedListener struct {
	net.Listener
	addr *net.TCPAddr
}

func (l fixedListener) Addr() net.Addr { return l.addr }
func (l fixedListener) Close() error   { return nil }

func TestFreePortSkipsARepeatedPort(t *testing.T) {
	// The kernel offers 40001 three times, then 40002.
	offers := []int{40001, 40001, 40001, 40002}
	listen = func(string, string) (net.Listener, error) {
		port := offers[0]
		if len(offers) > 1 {
			offers = offers[1:]
		}
		return fixedListener{addr: &net.TCPAddr{IP: net.IPv4(127, 0, 99, 1), Port: port}}, nil
	}
	defer func() { listen = net.Listen }()
	var got []int
	for range 2 {
		port, err := FreePort("127.0.99.1")
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, port)
	}
	if got[0] != 40001 || got[1] != 40002 {
		t.Errorf("ports %v, want 40001 then 40002 (never one twice)", got)
	}
}
