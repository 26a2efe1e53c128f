package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/peerd-project/peerd/transfer"
	"golang.org/x/sys/unix"
)

func init() {
	register("warm", "fetch images or artifacts into a running daemon's cache, from peers first, with progress", warmCmd)
}

func warmCmd(args []string) error {
	fs := newFlagSet("warm", "Ask the running daemon to fetch each reference (<registry>/<repository>:<tag> or\n@sha256:<hex>, the registry one of its --registries) into its cache: every file of\nthe image or artifact, from this node, its peers, then the registry. A progress bar\non a terminal, plain lines otherwise; the exit status is 1 when any reference failed.")
	addr := fs.String("http-addr", runDefault("http-addr"), "the running daemon's --http-addr")
	plain := fs.Bool("plain", false, "plain lines even on a terminal")
	timeout := fs.Duration("timeout", time.Hour, "bound on each reference's warming")
	positional[fs] = true
	if err := parse(fs, args); err != nil {
		return err
	}
	refs := fs.Args()
	if len(refs) == 0 {
		return errors.New("name at least one reference, e.g. peerd warm 10.0.0.5:5000/models/demo:v1")
	}
	base, err := daemonURL(*addr)
	if err != nil {
		return err
	}
	tty := !*plain && isTerminal(os.Stdout)
	failed := 0
	for _, ref := range refs {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		err := warmOne(ctx, base, ref, newWarmView(os.Stdout, tty, termWidth(os.Stdout)))
		cancel()
		if err != nil {
			failed++
			fmt.Fprintf(os.Stderr, "peerd warm %s: %v\n", ref, err)
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d references failed", failed, len(refs))
	}
	return nil
}

// daemonURL is the base URL of the daemon on addr; a daemon listening on
// every address is asked on loopback.
func daemonURL(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("--http-addr %q: %v", addr, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port), nil
}

func warmOne(ctx context.Context, base, ref string, view *warmView) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+warmPath+"?ref="+url.QueryEscape(ref), nil)
	if err != nil {
		return err
	}
	req.Header.Set(warmHeader, "1")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("the daemon does not answer: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var last warmEvent
	for sc.Scan() {
		if err := json.Unmarshal(sc.Bytes(), &last); err != nil {
			return fmt.Errorf("the daemon's progress is not what this peerd reads: %v", err)
		}
		view.show(last)
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("progress cut off: %w", err)
	}
	if !last.Finished {
		return errors.New("the daemon stopped before the end")
	}
	if last.Error != "" {
		return errors.New(last.Error)
	}
	return nil
}

// warmView renders a warm's progress: on a terminal one line redrawn in
// place, else a line per finished file and the summary.
type warmView struct {
	w        io.Writer
	tty      bool
	width    int // the terminal's columns
	lastFile string
	drawn    bool
}

func newWarmView(w io.Writer, tty bool, width int) *warmView {
	return &warmView{w: w, tty: tty, width: width}
}

const barWidth = 20

func (v *warmView) show(e warmEvent) {
	if e.Finished {
		if v.tty && v.drawn {
			fmt.Fprint(v.w, "\r\033[K")
		}
		if e.Error == "" {
			fmt.Fprintln(v.w, warmSummary(e))
		}
		return
	}
	if !v.tty {
		if e.File != "" && e.FileDone == e.FileSize && e.File != v.lastFile {
			v.lastFile = e.File
			fmt.Fprintf(v.w, "%s  %s  %s  %s\n", e.Ref, e.File, humanBytes(e.FileSize), sources(e.FileBytes))
		}
		return
	}
	pct := 100.0
	if e.Total > 0 {
		pct = math.Floor(100 * float64(e.Done) / float64(e.Total))
	}
	fill := int(pct / 100 * barWidth)
	bar := strings.Repeat("#", fill) + strings.Repeat(".", barWidth-fill)
	rate, eta := "", ""
	if e.Seconds > 0 && e.Done > 0 {
		r := float64(e.Done) / e.Seconds
		rate = shortBytes(int64(r)) + "/s"
		if d := time.Duration(float64(e.Total-e.Done) / r * float64(time.Second)).Round(time.Second); d > 0 {
			eta = "ETA " + d.String()
		}
	}
	// Most important first: a narrow terminal cuts the end.
	line := fmt.Sprintf("%s [%s] %3.0f%% %s/%s  %s %s  %s", trimTo(e.File, 18), bar, pct, shortBytes(e.Done), shortBytes(e.Total), rate, eta, shortSources(e.Bytes))
	// A line longer than the terminal wraps, and the carriage return would
	// then redraw only its last part.
	line = strings.TrimRight(line, " ")
	if r := []rune(line); v.width > 1 && len(r) >= v.width {
		line = string(r[:v.width-1])
	}
	fmt.Fprint(v.w, "\r\033[K"+line)
	v.drawn = true
}

func warmSummary(e warmEvent) string {
	rate := ""
	if e.Seconds > 0 {
		rate = fmt.Sprintf(" (%s/s)", humanBytes(int64(float64(e.Done)/e.Seconds)))
	}
	return fmt.Sprintf("warmed %s: %d files, %s in %s%s; %s", e.Ref, e.Files, humanBytes(e.Done),
		time.Duration(e.Seconds*float64(time.Second)).Round(10*time.Millisecond), rate, sourcesAll(e))
}

// sources names the sources that sent bytes: "peers 3.0 MiB · registry 1.0 MiB".
func sources(b transfer.Bytes) string { return listSources(b, humanBytes, " · ") }

func sourcesAll(e warmEvent) string {
	return fmt.Sprintf("cache %s, containerd %s, peers %s, registry %s",
		humanBytes(e.Bytes.Cache), humanBytes(e.Bytes.Containerd), humanBytes(e.Bytes.Peers), humanBytes(e.Bytes.Origin))
}

func trimTo(s string, n int) string {
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return fmt.Sprintf("%-*s", n, s)
}

// shortSources is sources for the progress line: "peers 3.0M registry 1.0M".
func shortSources(b transfer.Bytes) string { return listSources(b, shortBytes, " ") }

// listSources lists the sources with bytes, each as name and format(n).
func listSources(b transfer.Bytes, format func(int64) string, sep string) string {
	var parts []string
	for _, s := range []struct {
		name string
		n    int64
	}{{"cache", b.Cache}, {"containerd", b.Containerd}, {"peers", b.Peers}, {"registry", b.Origin}} {
		if s.n > 0 {
			parts = append(parts, s.name+" "+format(s.n))
		}
	}
	return strings.Join(parts, sep)
}

// shortBytes is n in binary units, one letter: 670B, 3.0M, 1.2G.
func shortBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fG", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fM", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fK", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}

// humanBytes is n in B, KiB, MiB or GiB with one decimal.
func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// termWidth is f's terminal's width in columns (80 when it cannot tell).
func termWidth(f *os.File) int {
	ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ)
	if err != nil || ws.Col == 0 {
		return 80
	}
	return int(ws.Col)
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
