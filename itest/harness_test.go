// Package itest runs real peerd processes on loopback addresses
// (127.0.x.y) against real local servers. It is the integration layer of
// `make test`; the multi-namespace cluster scenarios live in e2e/.
package itest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/testproc"
)

// peerdBin is the binary under test, built once by TestMain.
var peerdBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "peerd-itest-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	peerdBin = filepath.Join(dir, "peerd")
	build := exec.Command("go", "build", "-o", peerdBin, "../cmd/peerd")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build peerd:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var ipCounter atomic.Int32

// NextIP hands out a loopback address no other node of this run used.
func NextIP() string {
	n := ipCounter.Add(1)
	return fmt.Sprintf("127.0.%d.%d", 10+n/250, 1+n%250)
}

// FreePort returns a TCP port free on ip and not handed out before in this
// run (testproc.FreePort), or fails the test.
func FreePort(t testing.TB, ip string) int {
	t.Helper()
	port, err := testproc.FreePort(ip)
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// NodeOpts describe one peerd process.
type NodeOpts struct {
	IP      string   // default: NextIP()
	DataDir string   // default: a fresh temp dir (pass an old node's to restart on its data)
	Args    []string // extra flags for `peerd run`
	Env     []string // extra environment
	// NoMount leaves --mount= off when the FUSE flag exists; default true (tests opt in).
	Mount string
}

// Node is a running `peerd run`.
type Node struct {
	t        testing.TB
	Name     string
	IP       string
	HTTPAddr string
	DataDir  string
	LogPath  string
	args     []string
	env      []string
	proc     *testproc.Proc
}

var nodeSeq atomic.Int32

// StartNode starts peerd and waits until /healthz answers.
func StartNode(t testing.TB, o NodeOpts) *Node {
	t.Helper()
	if o.IP == "" {
		o.IP = NextIP()
	}
	if o.DataDir == "" {
		o.DataDir = t.TempDir()
	}
	port := FreePort(t, o.IP)
	n := &Node{
		t:        t,
		Name:     fmt.Sprintf("node%d", nodeSeq.Add(1)),
		IP:       o.IP,
		HTTPAddr: net.JoinHostPort(o.IP, strconv.Itoa(port)),
		DataDir:  o.DataDir,
		env:      o.Env,
	}
	n.LogPath = filepath.Join(t.TempDir(), n.Name+".log")
	n.args = append([]string{"run",
		"--data-dir", o.DataDir,
		"--http-addr", n.HTTPAddr,
		"--log-level", "debug",
	}, defaultArgs(t, o)...)
	n.args = append(n.args, o.Args...)
	n.start()
	t.Cleanup(func() {
		n.Stop()
		if t.Failed() {
			n.DumpLog(80)
		}
	})
	return n
}

// defaultArgs adds the flags that keep a test node local to the machine.
// Its listeners get ports from FreePort too: a port the kernel picks for a
// :0 listener can be the one FreePort just handed to --http-addr (seen once:
// the peer data plane took the HTTP port).
func defaultArgs(t testing.TB, o NodeOpts) []string {
	var a []string
	if hasFlag("mount") {
		a = append(a, "--mount="+o.Mount)
	}
	if hasFlag("containerd-socket") && !contains(o.Args, "--containerd-socket") {
		a = append(a, "--containerd-socket=") // containerd off: its tests start their own
	}
	if hasFlag("p2p-addr") && !contains(o.Args, "--p2p-addr") {
		a = append(a, fmt.Sprintf("--p2p-addr=/ip4/%s/tcp/%d", o.IP, FreePort(t, o.IP)))
	}
	if hasFlag("peer-addr") && !contains(o.Args, "--peer-addr") {
		a = append(a, fmt.Sprintf("--peer-addr=%s:%d", o.IP, FreePort(t, o.IP)))
	}
	return a
}

func contains(args []string, flag string) bool {
	for _, s := range args {
		if s == flag || strings.HasPrefix(s, flag+"=") {
			return true
		}
	}
	return false
}

var (
	helpMu   sync.Mutex
	helpText = map[string]string{} // `peerd <sub> --help` by subcommand
)

// subHelp returns what `peerd <sub> --help` prints.
func subHelp(sub string) string {
	helpMu.Lock()
	defer helpMu.Unlock()
	h, ok := helpText[sub]
	if !ok {
		out, _ := exec.Command(peerdBin, sub, "--help").CombinedOutput()
		h = string(out)
		helpText[sub] = h
	}
	return h
}

// subHasFlag reports whether `peerd <sub>` knows --name.
func subHasFlag(sub, name string) bool {
	h := subHelp(sub)
	return strings.Contains(h, "  -"+name+" ") || strings.Contains(h, "  -"+name+"\n")
}

// hasFlag reports whether `peerd run` knows --name (parts land over time).
func hasFlag(name string) bool { return subHasFlag("run", name) }

func (n *Node) start() {
	n.t.Helper()
	// SIGTERM goes to peerd alone: the FUSE tests check that peerd's own
	// shutdown unmounts, which a signal to its mount helper would muddle.
	p, err := testproc.Start(testproc.Spec{Name: n.Name, Args: append([]string{peerdBin}, n.args...),
		Log: n.LogPath, Env: append(os.Environ(), n.env...), TermLeader: true})
	if err != nil {
		n.t.Fatal(err)
	}
	n.proc = p
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = testproc.Poll(ctx, 50*time.Millisecond, p.Done(), testproc.HTTPOK(nil, n.URL("/healthz")))
	switch {
	case errors.Is(err, testproc.ErrExited):
		n.DumpLog(60)
		n.t.Fatalf("%s exited during start: %v", n.Name, p.Err())
	case err != nil:
		n.DumpLog(60)
		n.t.Fatalf("%s did not become healthy in 30s: %v", n.Name, err)
	}
}

// Args returns the command line the node was started with.
func (n *Node) Args() []string { return n.args }

// PID of the running process.
func (n *Node) PID() int { return n.proc.PID() }

// Running reports whether the process is alive.
func (n *Node) Running() bool { return n.proc.Running() }

// Stop sends SIGTERM and waits up to 20s (then SIGKILL). It returns the exit error.
func (n *Node) Stop() error {
	if n.proc.Stop(20 * time.Second) {
		n.t.Errorf("%s did not stop within 20s of SIGTERM", n.Name)
	}
	return n.proc.Err()
}

// Kill sends SIGKILL and waits for the exit.
func (n *Node) Kill() { n.proc.Kill() }

// Restart stops (SIGTERM) and starts the node again with the same flags and data.
func (n *Node) Restart() {
	n.t.Helper()
	n.Stop()
	n.start()
}

// URL of a path on the node's HTTP face.
func (n *Node) URL(path string) string { return "http://" + n.HTTPAddr + path }

// DumpLog prints the last lines of the node's log to the test log.
func (n *Node) DumpLog(lines int) {
	n.t.Logf("--- last %d log lines of %s (%s) ---\n%s", lines, n.Name, n.HTTPAddr, testproc.Tail(n.LogPath, lines))
}

// Log returns the whole log so far.
func (n *Node) Log() string {
	b, _ := os.ReadFile(n.LogPath)
	return string(b)
}

// Get performs a GET (or HEAD with method) and returns status, headers and body.
func Get(t testing.TB, method, url string, hdr map[string]string) (int, http.Header, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, url, err)
	}
	return resp.StatusCode, resp.Header, body
}

// Metric returns the sum of the samples of a metric whose label set contains
// every given "k=v" pair (0 when absent).
func (n *Node) Metric(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	code, _, body := Get(t, "GET", n.URL("/metrics/prometheus"), nil)
	if code != 200 {
		t.Fatalf("metrics: status %d", code)
	}
	return SumMetric(string(body), name, labels...)
}

// SumMetric sums samples of name in Prometheus text whose labels include all given k=v.
func SumMetric(text, name string, labels ...string) float64 {
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		var lbl string
		switch {
		case strings.HasPrefix(rest, "{"):
			end := strings.Index(rest, "}")
			lbl, rest = rest[1:end], rest[end+1:]
		case strings.HasPrefix(rest, " "):
		default:
			continue // a longer metric name
		}
		ok := true
		for _, want := range labels {
			k, v, _ := strings.Cut(want, "=")
			if !strings.Contains(","+lbl+",", ","+k+`="`+v+`",`) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
		if err == nil {
			sum += f
		}
	}
	return sum
}

// RandomBlob returns n random bytes and their digest "sha256:<hex>".
func RandomBlob(t testing.TB, n int) ([]byte, string) {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b, Digest(b)
}

// Digest is "sha256:<hex>" of b.
func Digest(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// Origin is a local HTTP file origin that counts the body bytes it sends.
type Origin struct {
	URL  string // http://ip:port
	Host string // ip:port
	srv  *http.Server
	ln   net.Listener

	mu    sync.Mutex
	files map[string][]byte

	Sent     atomic.Int64 // body bytes written
	Requests atomic.Int64
	// Delay is added before every answer (nanoseconds).
	Delay atomic.Int64
	// Fail makes every request answer 503 while set.
	Fail atomic.Bool
	// IgnoreRange makes the origin answer 200 with the whole body.
	IgnoreRange atomic.Bool
	// Hang makes requests block until the client gives up.
	Hang atomic.Bool
	// LastHeaders holds the request headers of the latest request.
	lastHdr atomic.Value
}

// NewOrigin starts an origin on ip (default 127.0.0.1) on a free port.
func NewOrigin(t testing.TB, ip string) *Origin {
	t.Helper()
	if ip == "" {
		ip = "127.0.0.1"
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	o := &Origin{ln: ln, files: map[string][]byte{}, Host: ln.Addr().String()}
	o.URL = "http://" + o.Host
	o.srv = &http.Server{Handler: o}
	go o.srv.Serve(ln)
	t.Cleanup(func() { o.srv.Close() })
	return o
}

// Put serves b at path (which starts with /).
func (o *Origin) Put(path string, b []byte) string {
	o.mu.Lock()
	o.files[path] = b
	o.mu.Unlock()
	return o.URL + path
}

// Close stops the origin (connections refused afterwards).
func (o *Origin) Close() { o.srv.Close() }

// LastHeaders of the most recent request.
func (o *Origin) LastHeaders() http.Header {
	h, _ := o.lastHdr.Load().(http.Header)
	return h
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func (o *Origin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	o.Requests.Add(1)
	o.lastHdr.Store(r.Header.Clone())
	if d := o.Delay.Load(); d > 0 {
		time.Sleep(time.Duration(d))
	}
	if o.Hang.Load() {
		<-r.Context().Done()
		return
	}
	if o.Fail.Load() {
		http.Error(w, "origin failing", http.StatusServiceUnavailable)
		return
	}
	o.mu.Lock()
	b, ok := o.files[r.URL.Path]
	o.mu.Unlock()
	if !ok {
		http.NotFound(w, r)
		return
	}
	cw := countingWriter{ResponseWriter: w, n: &o.Sent}
	if o.IgnoreRange.Load() {
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		if r.Method != http.MethodHead {
			cw.Write(b)
		}
		return
	}
	http.ServeContent(cw, r, "", time.Time{}, bytes.NewReader(b))
}
