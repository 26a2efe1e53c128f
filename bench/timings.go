package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// timingsPath is where a bench file server tells when each request for a
// path arrived and when its first body byte left, so row 4 can split a
// miss's time to first byte into what happened before the origin saw the
// request, the origin's own time, and what happened after its first byte.
// Times are wall-clock nanoseconds: the client and the file server are
// different processes on the same machine.
const timingsPath = "/.bench-timings"

// originVisit is one request the file server answered.
type originVisit struct {
	Path    string
	Agent   string
	Arrived int64 // the handler started
	First   int64 // the first body byte was written (0: none)
}

// timed records every request h answers, keeping the last max.
type timed struct {
	h   http.Handler
	max int
	mu  sync.Mutex
	log []originVisit
}

func newTimed(h http.Handler) *timed { return &timed{h: h, max: 100000} }

func (t *timed) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == timingsPath {
		t.serveTimings(w, r)
		return
	}
	v := originVisit{Path: r.URL.Path, Agent: r.UserAgent(), Arrived: time.Now().UnixNano()}
	fw := &firstWrite{ResponseWriter: w}
	t.h.ServeHTTP(fw, r)
	v.First = fw.first
	t.mu.Lock()
	if len(t.log) >= t.max {
		t.log = append(t.log[:0], t.log[len(t.log)/2:]...)
	}
	t.log = append(t.log, v)
	t.mu.Unlock()
}

// serveTimings answers the visits of ?path=P, one per line:
// "ARRIVED FIRST AGENT".
func (t *timed) serveTimings(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Query().Get("path")
	t.mu.Lock()
	var out []originVisit
	for _, v := range t.log {
		if v.Path == p {
			out = append(out, v)
		}
	}
	t.mu.Unlock()
	w.Header().Set("Content-Type", "text/plain")
	for _, v := range out {
		fmt.Fprintf(w, "%d %d %s\n", v.Arrived, v.First, v.Agent)
	}
}

// firstWrite notes when the first body byte is written (or handed to
// sendfile, which keeps the plain file server as fast as without the note).
var _ io.ReaderFrom = (*firstWrite)(nil)

type firstWrite struct {
	http.ResponseWriter
	first int64
}

func (f *firstWrite) Write(p []byte) (int, error) {
	if f.first == 0 && len(p) > 0 {
		f.first = time.Now().UnixNano()
	}
	return f.ResponseWriter.Write(p)
}

func (f *firstWrite) ReadFrom(r io.Reader) (int64, error) {
	if f.first == 0 {
		f.first = time.Now().UnixNano()
	}
	if rf, ok := f.ResponseWriter.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{f.ResponseWriter}, r)
}

func (f *firstWrite) Flush() {
	if fl, ok := f.ResponseWriter.(http.Flusher); ok {
		fl.Flush()
	}
}

// originVisits asks the file server at base which requests it answered for path.
func originVisits(ctx context.Context, base, path string) ([]originVisit, error) {
	body, err := getBody(ctx, base+timingsPath+"?path="+url.QueryEscape(path))
	if err != nil {
		return nil, err
	}
	var out []originVisit
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		f := strings.SplitN(sc.Text(), " ", 3)
		if len(f) < 2 {
			continue
		}
		a, err1 := strconv.ParseInt(f[0], 10, 64)
		b, err2 := strconv.ParseInt(f[1], 10, 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%s: bad line %q", timingsPath, sc.Text())
		}
		v := originVisit{Path: path, Arrived: a, First: b}
		if len(f) == 3 {
			v.Agent = f[2]
		}
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Arrived < out[j].Arrived })
	return out, sc.Err()
}

// missSplit is one time to first byte, cut at the origin: before (the
// client's request until the origin's handler started), origin (its handler
// until its first body byte) and after (that byte until the client's).
type missSplit struct{ before, origin, after time.Duration }

// splitAt cuts a request that started at start (wall clock) and saw its first
// byte at first at the origin visit v.
func splitAt(start, first time.Time, v originVisit) (missSplit, bool) {
	if v.First == 0 {
		return missSplit{}, false
	}
	a, f := time.Unix(0, v.Arrived), time.Unix(0, v.First)
	return missSplit{before: a.Sub(start), origin: f.Sub(a), after: first.Sub(f)}, true
}

// missPair is one row-4 sample cut at the origin: the same new blob read
// straight from the origin and through peerd.
type missPair struct {
	direct, through missSplit
	asks            int // requests peerd sent the origin for the blob
}

// own is the time peerd added that was not the origin's: the total added
// minus how much longer the origin's handler took for peerd's request.
func (m missPair) own() time.Duration {
	return m.through.before + m.through.after - m.direct.before - m.direct.after
}

func (m missPair) added() time.Duration {
	return m.through.before + m.through.origin + m.through.after - m.direct.before - m.direct.origin - m.direct.after
}

// splitMiss cuts both requests of a row-4 sample at the origin's visits: the
// bench's own request is the direct one, the first of peerd's is the miss.
func splitMiss(ctx context.Context, o *origin, rel string, ds, df, ps, pf time.Time) (missPair, bool) {
	vs, err := originVisits(ctx, o.fs.URL, "/"+rel)
	if err != nil {
		return missPair{}, false
	}
	var m missPair
	var okD, okP bool
	for _, v := range vs {
		switch {
		case strings.HasPrefix(v.Agent, "peerd"):
			m.asks++
			if !okP {
				m.through, okP = splitAt(ps, pf, v)
			}
		case !okD:
			m.direct, okD = splitAt(ds, df, v)
		}
	}
	return m, okD && okP
}

// reportMissSplits adds row 4's diagnostic: where a miss's time to first
// byte went, through peerd and direct, and the slowest samples cut up.
func reportMissSplits(t *table, where string, ps []missPair) {
	if len(ps) == 0 {
		t.note("row 4 (%s): no sample could be cut at the origin", where)
		return
	}
	part := func(f func(missPair) time.Duration) string {
		d := make([]time.Duration, len(ps))
		for i, p := range ps {
			d[i] = f(p)
		}
		return ms(quantile(d, .5)) + " / " + ms(quantile(d, .99))
	}
	t.add(row{group: "4", what: fmt.Sprintf("(diagnostic) miss (%s), p50 / p99: before the origin saw the request", where),
		peerd: part(func(p missPair) time.Duration { return p.through.before }), baseline: part(func(p missPair) time.Duration { return p.direct.before }) + " direct"})
	t.add(row{group: "4", what: fmt.Sprintf("(diagnostic) miss (%s), p50 / p99: the origin's handler until its first byte", where),
		peerd: part(func(p missPair) time.Duration { return p.through.origin }), baseline: part(func(p missPair) time.Duration { return p.direct.origin }) + " direct"})
	t.add(row{group: "4", what: fmt.Sprintf("(diagnostic) miss (%s), p50 / p99: the origin's first byte until the client's", where),
		peerd: part(func(p missPair) time.Duration { return p.through.after }), baseline: part(func(p missPair) time.Duration { return p.direct.after }) + " direct"})
	t.add(row{group: "4", what: fmt.Sprintf("(diagnostic) miss (%s), p50 / p99: added outside the origin's handler (before + after, through − direct)", where),
		peerd: part(missPair.own)})
	asks := 0
	for _, p := range ps {
		asks += p.asks
	}
	slow := slices.Clone(ps)
	slices.SortFunc(slow, func(a, b missPair) int { return int(b.added() - a.added()) })
	var b strings.Builder
	for _, p := range slow[:min(5, len(slow))] {
		fmt.Fprintf(&b, "; +%.1f = before %.1f−%.1f, origin %.1f−%.1f, after %.1f−%.1f",
			msf(p.added()), msf(p.through.before), msf(p.direct.before), msf(p.through.origin), msf(p.direct.origin), msf(p.through.after), msf(p.direct.after))
	}
	t.note("row 4 (%s): %d of the samples cut at the origin, %d origin requests from peerd; the 5 most added (ms, through−direct)%s", where, len(ps), asks, b.String())
}

func msf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// ttfbClient times first bytes from a child process (this binary
// re-executed, `peerd-bench ttfb-client`): row 4 in the 100-node DHT runs
// beside that DHT's nodes, which live in this process, and a client sharing
// their scheduler would time its own wait for a turn behind them.
type ttfbClient struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

func startTTFBClient() (*ttfbClient, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, "ttfb-client")
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &ttfbClient{cmd: cmd, in: in, out: bufio.NewReader(out)}, nil
}

// at is ttfbAt, run by the child.
func (c *ttfbClient) at(url string, size int64) (start, first time.Time, err error) {
	if _, err := fmt.Fprintf(c.in, "%s %d\n", url, size); err != nil {
		return start, first, err
	}
	line, err := c.out.ReadString('\n')
	if err != nil {
		return start, first, fmt.Errorf("ttfb client: %w", err)
	}
	var s, f int64
	if _, err := fmt.Sscanf(line, "%d %d", &s, &f); err != nil {
		return start, first, fmt.Errorf("ttfb client: %s", strings.TrimSpace(line))
	}
	return time.Unix(0, s), time.Unix(0, f), nil
}

func (c *ttfbClient) stop() {
	c.in.Close()
	c.cmd.Wait()
}

// runTTFBClient is the child side of startTTFBClient: each input line "URL
// SIZE" is answered "START FIRST" (wall-clock nanoseconds) or an error.
func runTTFBClient() {
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		var url string
		var size int64
		if _, err := fmt.Sscanf(sc.Text(), "%s %d", &url, &size); err != nil {
			fmt.Printf("error: bad request %q\n", sc.Text())
			continue
		}
		start, first, err := ttfbAt(context.Background(), url, size)
		if err != nil {
			fmt.Printf("error: %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
			continue
		}
		fmt.Printf("%d %d\n", start.UnixNano(), first.UnixNano())
	}
}
