package main

import (
	"bufio"
	"context"
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
	"sync/atomic"
	"syscall"
	"time"

	"github.com/peerd-project/peerd/internal/testproc"
)

// ipSeq hands out loopback addresses; every process of a run gets its own,
// as nodes of a cluster would.
var ipSeq atomic.Int32

func nextIP() string {
	n := ipSeq.Add(1)
	return fmt.Sprintf("127.0.%d.%d", 60+n/250, 1+n%250)
}

// node is one `peerd run` process bound to its own loopback address.
type node struct {
	IP       string
	HTTPAddr string
	DataDir  string
	P2PAddr  string // full multiaddr with /p2p/<id>
	PeerAddr string
	LogPath  string
	proc     *testproc.Proc
}

type nodeOpts struct {
	mount string   // --mount value ("" = off)
	args  []string // extra flags
}

// startNode runs peerd with its data under dir and waits for /healthz. p2p
// listens on the node's loopback address only; containerd is off.
func startNode(ctx context.Context, cfg *config, dir string, o nodeOpts) (*node, error) {
	ip := nextIP()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	idOut, err := exec.CommandContext(ctx, cfg.peerd, "id", "--data-dir", dir).Output()
	if err != nil {
		return nil, fmt.Errorf("peerd id: %w", err)
	}
	id := strings.TrimSpace(string(idOut))
	var ports [3]int
	for i := range ports {
		if ports[i], err = testproc.FreePort(ip); err != nil {
			return nil, err
		}
	}
	n := &node{IP: ip, DataDir: dir,
		HTTPAddr: fmt.Sprintf("%s:%d", ip, ports[0]),
		P2PAddr:  fmt.Sprintf("/ip4/%s/tcp/%d/p2p/%s", ip, ports[1], id),
		PeerAddr: fmt.Sprintf("%s:%d", ip, ports[2]),
		LogPath:  dir + ".log",
	}
	args := []string{"run",
		"--data-dir", dir,
		"--http-addr", n.HTTPAddr,
		"--p2p-addr", fmt.Sprintf("/ip4/%s/tcp/%d", ip, ports[1]),
		"--peer-addr", n.PeerAddr,
		"--containerd-socket=",
		"--mount=" + o.mount,
		"--log-level", "info",
	}
	if cfg.pprof != "" {
		args = append(args, "--debug-pprof")
	}
	args = append(args, o.args...)
	// A BENCH_DIR of an earlier run may hold this log: start it empty.
	// SIGTERM goes to peerd alone, so its FUSE mount's helper sees peerd's
	// own unmount.
	if n.proc, err = testproc.Start(testproc.Spec{Name: "peerd", Args: append([]string{cfg.peerd}, args...),
		Log: n.LogPath, Truncate: true, TermLeader: true}); err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err = testproc.Poll(wctx, 50*time.Millisecond, n.proc.Done(), func(ctx context.Context) error {
		code, err := status(ctx, n.URL("/healthz"))
		if err == nil && code != 200 {
			err = fmt.Errorf("/healthz: %d", code)
		}
		return err
	})
	switch {
	case err == nil:
		return n, nil
	case errors.Is(err, testproc.ErrExited):
		return nil, fmt.Errorf("peerd exited during start (%v); log:\n%s", n.proc.Err(), n.proc.Tail(20))
	case ctx.Err() != nil:
		n.Stop()
		return nil, ctx.Err()
	}
	n.Stop()
	return nil, fmt.Errorf("peerd not healthy in 30s (%v); log:\n%s", err, n.proc.Tail(20))
}

func (n *node) URL(p string) string { return "http://" + n.HTTPAddr + p }
func (n *node) PID() int            { return n.proc.PID() }

// waitReady waits for /readyz (peers connected).
func (n *node) waitReady(ctx context.Context, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if code, err := status(ctx, n.URL("/readyz")); err == nil && code == 200 {
			return nil
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	return fmt.Errorf("%s not ready within %v", n.HTTPAddr, d)
}

// Stop sends SIGTERM, waits up to 20 s, then kills the process group.
func (n *node) Stop() {
	if n == nil {
		return
	}
	n.proc.Stop(20 * time.Second)
}

// metric sums the samples of name whose labels contain every k=v given.
func (n *node) metric(ctx context.Context, name string, labels ...string) (float64, error) {
	body, err := getBody(ctx, n.URL("/metrics/prometheus"))
	if err != nil {
		return 0, err
	}
	var sum float64
	for _, line := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(line, "#") || !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		var lbl string
		switch {
		case strings.HasPrefix(rest, "{"):
			end := strings.Index(rest, "}")
			if end < 0 {
				continue
			}
			lbl, rest = rest[1:end], rest[end+1:]
		case strings.HasPrefix(rest, " "):
		default:
			continue
		}
		ok := true
		for _, want := range labels {
			k, v, _ := strings.Cut(want, "=")
			ok = ok && strings.Contains(","+lbl+",", ","+k+`="`+v+`",`)
		}
		if f, err := strconv.ParseFloat(strings.TrimSpace(rest), 64); ok && err == nil {
			sum += f
		}
	}
	return sum, nil
}

// waitMetric waits until the metric reaches at least want.
func (n *node) waitMetric(ctx context.Context, want float64, d time.Duration, name string, labels ...string) error {
	deadline := time.Now().Add(d)
	var got float64
	for time.Now().Before(deadline) {
		got, _ = n.metric(ctx, name, labels...)
		if got >= want {
			return nil
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	return fmt.Errorf("%s: %s %v stayed at %v, want >= %v", n.HTTPAddr, name, labels, got, want)
}

// profile saves a CPU profile of secs seconds to path (needs --debug-pprof).
func (n *node) profile(ctx context.Context, secs int, path string) error {
	kind := "profile"
	if strings.HasSuffix(path, ".trace") {
		kind = "trace"
	}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(secs+30)*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", n.URL(fmt.Sprintf("/debug/pprof/%s?seconds=%d", kind, secs)), nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("pprof: %s", resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// fileServer is a plain Go http.FileServer in a child process (this binary
// re-executed), so its CPU time can be read apart from the client's.
type fileServer struct {
	URL string
	cmd *exec.Cmd
}

func startFileServer(ctx context.Context, ip, dir string) (*fileServer, error) {
	return startPacedFileServer(ctx, ip, dir, 0)
}

// startPacedFileServer starts a file server whose response bodies, over all
// its connections together, go out at most rate bytes per second (0: no
// limit), as from an origin behind a link of that speed.
func startPacedFileServer(ctx context.Context, ip, dir string, rate int64) (*fileServer, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	args := []string{"fileserver", ip, dir}
	if rate > 0 {
		args = append(args, strconv.FormatInt(rate, 10))
	}
	cmd := exec.Command(self, args...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	select {
	case s := <-line:
		if !strings.HasPrefix(s, "http://") {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, fmt.Errorf("file server did not start (%q)", s)
		}
		return &fileServer{URL: s, cmd: cmd}, nil
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		return nil, errors.New("file server did not start in 10s")
	case <-ctx.Done():
		cmd.Process.Kill()
		cmd.Wait()
		return nil, ctx.Err()
	}
}

func (f *fileServer) PID() int { return f.cmd.Process.Pid }

func (f *fileServer) Stop() {
	if f == nil {
		return
	}
	f.cmd.Process.Signal(syscall.SIGTERM)
	f.cmd.Wait()
}

// runFileServer is the child side of startPacedFileServer: `peerd-bench
// fileserver IP DIR [BYTES_PER_SEC]`.
func runFileServer(args []string) {
	ip, dir := args[0], args[1]
	var h http.Handler = http.FileServer(http.Dir(dir))
	if len(args) > 2 {
		rate, err := strconv.ParseInt(args[2], 10, 64)
		if err != nil || rate <= 0 {
			fmt.Fprintf(os.Stderr, "fileserver: rate %q: want a positive number of bytes per second\n", args[2])
			os.Exit(2)
		}
		// A burst of four pieces lets a sleep that overshoots be made up
		// by the next pieces without exceeding the rate over any longer span.
		h = paced(h, newPacer(rate, 4*pacePiece, time.Now))
	}
	h = newTimed(h)
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "fileserver:", err)
		os.Exit(1)
	}
	fmt.Printf("http://%s\n", ln.Addr())
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		sig := make(chan os.Signal, 1)
		signalNotify(sig)
		<-sig
		srv.Close()
	}()
	srv.Serve(ln)
}

// cpuSeconds is user+system CPU time of a process so far.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(s[i+1:])
	// After the command: state is field 3, utime 14 and stime 15 (1-based).
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	ut, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad times", pid)
	}
	return (ut + st) / clockTicks, nil
}

// USER_HZ is 100 on every Linux architecture Go supports.
const clockTicks = 100

// rssMiB reads VmRSS (field "VmRSS" or "VmHWM") of a process in MiB.
func rssMiB(pid int, field string) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no %s", pid, field)
}

// rssParts says what a process's RSS holds: anonymous memory (heap, stacks:
// what the process costs the node) and file pages (mostly its own binary's
// code, which the kernel maps in as it runs and may drop at any time).
func rssParts(pid int) string {
	anon, err1 := rssMiB(pid, "RssAnon")
	file, err2 := rssMiB(pid, "RssFile")
	if err1 != nil || err2 != nil {
		return "RSS parts unknown"
	}
	return fmt.Sprintf("anonymous %.1f MiB, file pages (the binary) %.1f MiB", anon, file)
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// blobPath is the registry storage layout path of a digest, the form of
// URL a registry redirects to and /blobs/ takes the digest from.
func blobPath(hexd string) string {
	return filepath.Join("docker", "registry", "v2", "blobs", "sha256", hexd[:2], hexd, "data")
}
