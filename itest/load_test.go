package itest

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/internal/reliability"
	"github.com/prometheus/client_golang/prometheus"
)

// Load tests: many clients, many idle connections, many cached blobs, each
// against one real peerd process. They record their figures as rows of the
// README's Reliability table (Area "load"); -short skips them.

func loadSkipShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping: load test (-short)")
	}
}

// procStatusKiB reads a "VmHWM:"-style field of /proc/<pid>/status in KiB.
func procStatusKiB(t testing.TB, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("read status of %d: %v", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			f := strings.Fields(rest)
			v, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				t.Fatalf("%s: %q", field, line)
			}
			return v
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// nofileLimits returns the soft and hard "Max open files" of a process.
func nofileLimits(t testing.TB, pid int) (string, string) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			f := strings.Fields(rest)
			return f[0], f[1]
		}
	}
	t.Fatalf("no Max open files in /proc/%d/limits", pid)
	return "", ""
}

// raiseNoFile lifts this process's soft RLIMIT_NOFILE to at least want (up
// to the hard limit, which root may raise too): the test holds thousands of
// sockets at once.
func raiseNoFile(t testing.TB, want uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= want {
		return
	}
	if lim.Max < want {
		lim.Max = want
	}
	lim.Cur = want
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("raise RLIMIT_NOFILE to %d: %v", want, err)
	}
}

// startNodeLowNoFile starts a node whose inherited soft RLIMIT_NOFILE is
// 1024 (the usual login default), so that the test shows whether peerd
// raises its own soft limit to the hard one at start, as operators expect
// of a daemon that holds a socket per client.
func startNodeLowNoFile(t *testing.T, o NodeOpts) *Node {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	low := lim
	low.Cur = 1024
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	n := func() *Node {
		defer syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
		return StartNode(t, o)
	}()
	soft, hard := nofileLimits(t, n.PID())
	// The Go runtime of a peerd process raises its soft limit to the hard
	// limit less one at start.
	if s, h := parseLimit(soft), parseLimit(hard); s+1 < h {
		t.Fatalf("peerd started with soft RLIMIT_NOFILE 1024 has soft %s, hard %s: it must raise the soft limit", soft, hard)
	}
	return n
}

func parseLimit(s string) uint64 {
	if s == "unlimited" {
		return ^uint64(0)
	}
	v, _ := strconv.ParseUint(s, 10, 64)
	return v
}

// startNodeNoFile starts a node with RLIMIT_NOFILE soft and hard at limit,
// through a shell that sets it and execs peerd (same PID).
func startNodeNoFile(t *testing.T, o NodeOpts, limit uint64) *Node {
	t.Helper()
	wrapper := filepath.Join(t.TempDir(), "peerd-nofile")
	script := fmt.Sprintf("#!/bin/sh\nulimit -n %d || exit 111\nexec %s \"$@\"\n", limit, peerdBin)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	real := peerdBin
	peerdBin = wrapper
	defer func() { peerdBin = real }()
	n := StartNode(t, o)
	if soft, hard := nofileLimits(t, n.PID()); parseLimit(hard) != limit {
		t.Fatalf("peerd runs with RLIMIT_NOFILE %s/%s, want %d", soft, hard, limit)
	}
	return n
}

// loadClient is an HTTP client that opens as many connections as it has
// concurrent requests and keeps them.
func loadClient(conns int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		MaxIdleConns:        conns,
		MaxIdleConnsPerHost: conns,
		DisableCompression:  true,
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 30 * time.Second}).DialContext,
	}}
}

// rangeGet reads bytes [off, off+n) of url and checks them against want.
func rangeGet(c *http.Client, url string, want []byte, off, n int64) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("bytes %d+%d: read body: %w", off, n, err)
	}
	if resp.StatusCode != http.StatusPartialContent {
		return fmt.Errorf("bytes %d+%d: status %d: %.200s", off, n, resp.StatusCode, body)
	}
	if !bytes.Equal(body, want[off:off+n]) {
		return fmt.Errorf("bytes %d+%d: wrong bytes (%d received)", off, n, len(body))
	}
	return nil
}

// streamResult is what a burst of concurrent range readers saw.
type streamResult struct {
	requests int
	errs     []error
	lat      []time.Duration
	wall     time.Duration
}

func (r streamResult) String() string {
	return fmt.Sprintf("%d errors of %d; p50 %s, p99 %s", len(r.errs), r.requests, ms(pct(r.lat, 0.50)), ms(pct(r.lat, 0.99)))
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }

// concurrentRanges starts clients goroutines at once; each reads per
// random ranges of at most maxLen bytes of url, checking every byte.
func concurrentRanges(url string, data []byte, clients, per int, maxLen int64) streamResult {
	c := loadClient(clients)
	defer c.CloseIdleConnections()
	size := int64(len(data))
	var (
		mu  sync.Mutex
		res = streamResult{requests: clients * per}
		wg  sync.WaitGroup
	)
	start := make(chan struct{})
	for i := range clients {
		wg.Go(func() {
			rng := mrand.New(mrand.NewPCG(uint64(i), 17))
			<-start
			for range per {
				off := rng.Int64N(size)
				n := min(1+rng.Int64N(maxLen), size-off)
				t0 := time.Now()
				err := rangeGet(c, url, data, off, n)
				d := time.Since(t0)
				mu.Lock()
				res.lat = append(res.lat, d)
				if err != nil {
					res.errs = append(res.errs, err)
				}
				mu.Unlock()
			}
		})
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	res.wall = time.Since(t0)
	return res
}

func checkStreams(t *testing.T, what string, r streamResult) {
	t.Helper()
	for i, err := range r.errs {
		if i == 5 {
			t.Errorf("%s: ... %d errors in all", what, len(r.errs))
			break
		}
		t.Errorf("%s: %v", what, err)
	}
	t.Logf("%s: %s; %s wall", what, r, r.wall.Round(time.Millisecond))
}

// TestLoadThousandRangeStreams: 1,000 clients at once read random ranges of
// one 64 MiB blob through /blobs/, first while the blob is not cached (every
// client waits on fills) and then once it is; every byte is checked.
func TestLoadThousandRangeStreams(t *testing.T) {
	loadSkipShort(t)
	raiseNoFile(t, 8192)
	const (
		size    = 64 << 20
		clients = 1000
		per     = 3
		maxLen  = 256 << 10
	)
	origin := NewOrigin(t, "")
	data, dg := RandomBlob(t, size)
	url := origin.Put(storagePath(dg), data)
	n := startNodeLowNoFile(t, NodeOpts{Args: []string{"--upstream-allow", origin.Host}})
	blobURL := n.URL("/blobs/" + url)
	soft, _ := nofileLimits(t, n.PID())

	cold := concurrentRanges(blobURL, data, clients, per, maxLen)
	checkStreams(t, "cold", cold)
	coldHWM := procStatusKiB(t, n.PID(), "VmHWM")
	coldOrigin := origin.Sent.Load()

	// Complete and verify the blob, then read it warm.
	if code, _, body := Get(t, "GET", blobURL, nil); code != 200 || Digest(body) != dg {
		t.Fatalf("whole blob: status %d", code)
	}
	waitMetric(t, n, "peerd_cache_verifications_total", 1, "result=ok")
	origin.Requests.Store(0)
	warm := concurrentRanges(blobURL, data, clients, per, maxLen)
	checkStreams(t, "warm", warm)
	hwm := procStatusKiB(t, n.PID(), "VmHWM")
	if origin.Requests.Load() != 0 {
		t.Errorf("warm reads sent %d requests to the origin", origin.Requests.Load())
	}
	if !n.Running() {
		t.Fatal("peerd died under load")
	}
	t.Logf("peerd soft RLIMIT_NOFILE %s; peak RSS %d MiB after cold, %d MiB after warm; origin sent %.2fx the blob for the cold burst",
		soft, coldHWM>>10, hwm>>10, float64(coldOrigin)/size)
	if t.Failed() {
		return
	}
	reliability.Record(t, reliability.Row{Area: "load",
		Case:    fmt.Sprintf("%d clients at once, %d random Ranges (<= 256 KiB) each of one 64 MiB blob via /blobs/, not cached", clients, per),
		Outcome: "every byte correct; fills shared by the waiting clients",
		Figure:  fmt.Sprintf("%s; origin sent %.2fx the blob; peak RSS %d MiB", cold, float64(coldOrigin)/size, coldHWM>>10)})
	reliability.Record(t, reliability.Row{Area: "load",
		Case:    fmt.Sprintf("%d clients at once, %d random Ranges (<= 256 KiB) each of one cached 64 MiB blob via /blobs/", clients, per),
		Outcome: "every byte correct, no origin request",
		Figure:  fmt.Sprintf("%s; peak RSS %d MiB", warm, hwm>>10)})
}

// idleFlood holds n TCP connections to addr open, each having sent payload
// (nothing if empty); a connection the server closes is counted and
// replaced, as an attacker would.
type idleFlood struct {
	addr    string
	payload []byte
	stop    chan struct{}
	wg      sync.WaitGroup

	open     atomic.Int64
	closedBy atomic.Int64 // connections the server closed
	dialErrs atomic.Int64

	mu    sync.Mutex
	conns map[net.Conn]bool
	lives []time.Duration // open to closed-by-server
}

func startIdleFlood(t *testing.T, addr string, n int, payload []byte) *idleFlood {
	t.Helper()
	f := &idleFlood{addr: addr, payload: payload, stop: make(chan struct{}), conns: map[net.Conn]bool{}}
	for range n {
		f.wg.Go(f.hold)
	}
	t.Cleanup(f.Stop)
	deadline := time.Now().Add(30 * time.Second)
	for f.open.Load() < int64(n) {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d idle connections to %s open after 30s (%d dial errors)", f.open.Load(), n, addr, f.dialErrs.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	return f
}

func (f *idleFlood) hold() {
	for {
		select {
		case <-f.stop:
			return
		default:
		}
		c, err := net.DialTimeout("tcp", f.addr, 10*time.Second)
		if err != nil {
			f.dialErrs.Add(1)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		f.mu.Lock()
		stopping := f.conns == nil
		if !stopping {
			f.conns[c] = true
		}
		f.mu.Unlock()
		if stopping {
			c.Close()
			return
		}
		t0 := time.Now()
		if len(f.payload) > 0 {
			c.Write(f.payload)
		}
		f.open.Add(1)
		var b [512]byte
		for {
			if _, err := c.Read(b[:]); err != nil {
				break
			}
		}
		f.open.Add(-1)
		f.mu.Lock()
		mine := f.conns != nil && f.conns[c]
		if mine {
			delete(f.conns, c)
			f.lives = append(f.lives, time.Since(t0))
			f.closedBy.Add(1)
		}
		f.mu.Unlock()
		c.Close()
		if !mine {
			return
		}
	}
}

// Stop closes every connection and waits for the holders.
func (f *idleFlood) Stop() {
	f.mu.Lock()
	if f.conns == nil {
		f.mu.Unlock()
		return
	}
	close(f.stop)
	for c := range f.conns {
		c.Close()
	}
	f.conns = nil
	f.mu.Unlock()
	f.wg.Wait()
}

// waitClosed waits (at most a minute) until the server has closed n of the
// flood's connections on its own.
func (f *idleFlood) waitClosed(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for f.closedBy.Load() < int64(n) {
		if time.Now().After(deadline) {
			t.Fatalf("%s closed only %d of %d idle connections within a minute", f.addr, f.closedBy.Load(), n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Lives returns how long the connections the server closed had lived.
func (f *idleFlood) Lives() []time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Duration(nil), f.lives...)
}

// closedByServer sends payload on a fresh connection to addr and waits (at
// most bound) for the server to close it; it returns how long that took.
func closedByServer(addr string, payload []byte, bound time.Duration) (time.Duration, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	t0 := time.Now()
	if _, err := c.Write(payload); err != nil {
		return 0, err
	}
	c.SetReadDeadline(t0.Add(bound))
	var b [512]byte
	for {
		_, err := c.Read(b[:])
		if err == nil {
			continue
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return 0, fmt.Errorf("%s kept a connection that sent %q open for %s", addr, payload, bound)
		}
		return time.Since(t0), nil
	}
}

// slowClient runs closedByServer in the background.
type slowClient struct {
	d   time.Duration
	err error
	ok  chan struct{}
}

func startSlowClient(addr string, payload []byte) *slowClient {
	s := &slowClient{ok: make(chan struct{})}
	go func() {
		defer close(s.ok)
		s.d, s.err = closedByServer(addr, payload, 60*time.Second)
	}()
	return s
}

func (s *slowClient) wait(t *testing.T) time.Duration {
	t.Helper()
	<-s.ok
	if s.err != nil {
		t.Fatal(s.err)
	}
	return s.d
}

// normalRequests reads count random 64 KiB ranges of a cached blob one
// after another over one keep-alive connection, paced (normalGap apart) so
// that they span the flood; it fails the test on any error and returns the
// latencies.
func normalRequests(t *testing.T, url string, data []byte, count int) []time.Duration {
	t.Helper()
	c := loadClient(1)
	defer c.CloseIdleConnections()
	rng := mrand.New(mrand.NewPCG(uint64(count), 99))
	var lat []time.Duration
	for range count {
		off := rng.Int64N(int64(len(data)) - 64<<10)
		t0 := time.Now()
		if err := rangeGet(c, url, data, off, 64<<10); err != nil {
			t.Fatalf("normal request: %v", err)
		}
		lat = append(lat, time.Since(t0))
		time.Sleep(normalGap)
	}
	return lat
}

// peerChunks has node b read the given 1 MiB chunks (in that order) of a
// blob that only a peer holds; each is a transfer over the peer data plane.
func peerChunks(t *testing.T, url string, data []byte, chunks []int) []time.Duration {
	t.Helper()
	c := loadClient(1)
	defer c.CloseIdleConnections()
	var lat []time.Duration
	for _, i := range chunks {
		off := int64(i) << 20
		t0 := time.Now()
		if err := rangeGet(c, url, data, off, min(1<<20, int64(len(data))-off)); err != nil {
			t.Fatalf("peer read of chunk %d: %v", i, err)
		}
		lat = append(lat, time.Since(t0))
		time.Sleep(normalGap)
	}
	return lat
}

const normalGap = 25 * time.Millisecond

func quantiles(lat []time.Duration) string {
	return fmt.Sprintf("p50 %s, p99 %s", ms(pct(lat, 0.5)), ms(pct(lat, 0.99)))
}

func ratioOf(during, before []time.Duration, p float64) float64 {
	return float64(pct(during, p)) / float64(max(pct(before, p), time.Microsecond))
}

// TestLoadIdleConnectionFlood: 1,000 idle TCP connections on the HTTP face,
// then 1,000 on the peer data-plane port, while a stream of normal requests
// goes on; and a connection that sends half a request (slowloris) or half a
// TLS handshake is closed by the server's timeouts.
func TestLoadIdleConnectionFlood(t *testing.T) {
	loadSkipShort(t)
	raiseNoFile(t, 8192)
	const (
		idle   = 1000
		normal = 200
		size   = 16 << 20
	)
	origin := NewOrigin(t, "")
	allow := "--upstream-allow=" + origin.Host
	data, dg := RandomBlob(t, size)
	url := origin.Put(storagePath(dg), data)
	peerData, peerDg := RandomBlob(t, 48<<20)
	peerURL := origin.Put(storagePath(peerDg), peerData)

	a := startP2PNode(t, patient(allow)...)
	b := startP2PNode(t, patient(allow, "--bootstrap", a.P2PAddr)...)
	waitReady(t, a.Node)
	waitReady(t, b.Node)
	waitMetric(t, a.Node, "peerd_p2p_connected_peers", 1)
	// A holds both blobs; B will read the second one from A.
	for _, u := range []string{url, peerURL} {
		if code, _, _ := Get(t, "GET", a.URL("/blobs/"+u), nil); code != 200 {
			t.Fatalf("A: status %d", code)
		}
	}
	waitMetric(t, a.Node, "peerd_cache_verifications_total", 2, "result=ok")
	waitMetric(t, a.Node, "peerd_p2p_provides_total", 2, "result=ok")
	blobURL := a.URL("/blobs/" + url)
	bURL := b.URL("/blobs/" + peerURL)
	// B's chunks of the peer blob in random order (no read-ahead helps), the
	// first as a warm-up that pays the provider lookup.
	order := mrand.New(mrand.NewPCG(3, 4)).Perm(len(peerData) >> 20)
	peerChunks(t, bURL, peerData, order[:1])
	third := (len(order) - 1) / 3
	peerBefore := peerChunks(t, bURL, peerData, order[1:1+third])

	normalRequests(t, blobURL, data, 20) // warm-up
	before := normalRequests(t, blobURL, data, normal)
	originReqs := origin.Requests.Load()

	// HTTP face: 1,000 connections that never send a byte, plus one that
	// sends half a request header.
	httpFlood := startIdleFlood(t, a.HTTPAddr, idle, nil)
	halfHeader := []byte("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
	slowHTTP := startSlowClient(a.HTTPAddr, halfHeader)
	duringHTTP := normalRequests(t, blobURL, data, normal)
	httpOpen := httpFlood.open.Load()
	httpSlow := slowHTTP.wait(t)
	httpFlood.waitClosed(t, idle)
	httpFlood.Stop()
	httpLives := httpFlood.Lives()

	// Peer port: 1,000 connections that never start the TLS handshake, plus
	// one that sends half a ClientHello (a record header announcing 512
	// bytes, then 10 of them).
	peerFlood := startIdleFlood(t, a.PeerAddr, idle, nil)
	halfHello := append([]byte{0x16, 0x03, 0x01, 0x02, 0x00}, make([]byte, 10)...)
	slowPeer := startSlowClient(a.PeerAddr, halfHello)
	duringPeerNormal := normalRequests(t, blobURL, data, normal)
	recv0 := b.Metric(t, "peerd_p2p_received_bytes_total")
	peerDuring := peerChunks(t, bURL, peerData, order[1+third:1+2*third])
	recv := b.Metric(t, "peerd_p2p_received_bytes_total") - recv0
	peerOpen := peerFlood.open.Load()
	peerSlow := slowPeer.wait(t)
	peerFlood.waitClosed(t, idle)
	peerFlood.Stop()
	peerLives := peerFlood.Lives()

	if origin.Requests.Load() != originReqs {
		t.Errorf("the origin got %d requests during the floods", origin.Requests.Load()-originReqs)
	}
	if want := float64(third) * (1 << 20) * 0.99; recv < want {
		t.Errorf("B received %.0f bytes from peers during the flood, want >= %.0f", recv, want)
	}
	if httpOpen < idle*9/10 || peerOpen < idle*9/10 {
		t.Errorf("idle connections held at the end: HTTP %d, peer %d of %d", httpOpen, peerOpen, idle)
	}
	if !a.Running() {
		t.Fatal("peerd died under the flood")
	}
	lifeFig := func(l []time.Duration) string {
		return fmt.Sprintf("idle connections closed by the server after p50 %s", pct(l, 0.5).Round(100*time.Millisecond))
	}
	t.Logf("normal requests (64 KiB from A's cache): before %s; during HTTP flood %s (p50 x%.2f, p99 x%.2f); during peer flood %s (p50 x%.2f, p99 x%.2f)",
		quantiles(before), quantiles(duringHTTP), ratioOf(duringHTTP, before, .5), ratioOf(duringHTTP, before, .99),
		quantiles(duringPeerNormal), ratioOf(duringPeerNormal, before, .5), ratioOf(duringPeerNormal, before, .99))
	t.Logf("peer transfers (1 MiB, B from A): before %s; during peer flood %s (p50 x%.2f, p99 x%.2f)",
		quantiles(peerBefore), quantiles(peerDuring), ratioOf(peerDuring, peerBefore, .5), ratioOf(peerDuring, peerBefore, .99))
	t.Logf("half header on the HTTP face closed after %s; half ClientHello on the peer port closed after %s; HTTP flood: %s; peer flood: %s",
		httpSlow.Round(10*time.Millisecond), peerSlow.Round(10*time.Millisecond), lifeFig(httpLives), lifeFig(peerLives))
	if t.Failed() {
		return
	}
	reliability.Record(t, reliability.Row{Area: "load",
		Case:    fmt.Sprintf("%d idle TCP connections held on the HTTP face while %d normal 64 KiB range requests run", idle, normal),
		Outcome: "every normal request served; idle connections closed by the header timeout",
		Figure: fmt.Sprintf("before %s; during %s (p99 x%.2f); %s", quantiles(before), quantiles(duringHTTP),
			ratioOf(duringHTTP, before, .99), lifeFig(httpLives))})
	reliability.Record(t, reliability.Row{Area: "load",
		Case:    fmt.Sprintf("%d idle TCP connections held on the peer data-plane port while a peer reads 1 MiB chunks from the node", idle),
		Outcome: "every peer transfer and normal request served; idle connections closed by the handshake timeout",
		Figure: fmt.Sprintf("peer chunks before %s, during %s (p99 x%.2f); HTTP requests during %s (p99 x%.2f); %s",
			quantiles(peerBefore), quantiles(peerDuring), ratioOf(peerDuring, peerBefore, .99),
			quantiles(duringPeerNormal), ratioOf(duringPeerNormal, before, .99), lifeFig(peerLives))})
	reliability.Record(t, reliability.Row{Area: "load",
		Case:    "slowloris: half a request header on the HTTP face; half a TLS ClientHello on the peer port",
		Outcome: "both connections closed by the server",
		Figure:  fmt.Sprintf("HTTP closed after %s; peer port after %s", httpSlow.Round(10*time.Millisecond), peerSlow.Round(10*time.Millisecond))})
}

// bytesSource serves blobs from memory to a cache, as the origin would.
type bytesSource struct{ blobs map[blob.Key][]byte }

func (bytesSource) Name() string { return "test" }
func (s bytesSource) Fetch(_ context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	b, ok := s.blobs[k]
	if !ok {
		return nil, -1, blob.ErrNotFound
	}
	end := min(off+n, int64(len(b)))
	return io.NopCloser(bytes.NewReader(b[off:end])), int64(len(b)), nil
}

// fillCache creates a cache under dataDir (where `peerd run --data-dir`
// keeps it) holding count small random blobs, each read through the cache
// API from an in-memory source; it returns the blobs by digest. The blobs
// are filled in batches, each into a cache of its own whose blob folders
// are then moved into the one cache, so that the files of blobs waiting for
// their flush never add up to this process's descriptor limit.
func fillCache(t *testing.T, dataDir string, count int, chunkSize int64) map[string][]byte {
	t.Helper()
	const batch = 2000
	byDigest := map[string][]byte{}
	final := filepath.Join(dataDir, "cache", "blobs", blob.AlgSHA256)
	if err := os.MkdirAll(final, 0o700); err != nil {
		t.Fatal(err)
	}
	for done := 0; done < count; done += batch {
		src := bytesSource{blobs: map[blob.Key][]byte{}}
		for i := done; i < min(done+batch, count); i++ {
			b := make([]byte, 1024+i%4096)
			crand.Read(b)
			dg := Digest(b)
			k, err := blob.ParseDigest(dg)
			if err != nil {
				t.Fatal(err)
			}
			src.blobs[k] = b
			byDigest[dg] = b
		}
		dir := t.TempDir()
		c, err := cache.Open(cache.Options{Dir: dir, ChunkSize: chunkSize,
			Logger: slog.New(slog.DiscardHandler), Registerer: prometheus.NewRegistry()})
		if err != nil {
			t.Fatal(err)
		}
		keys := make(chan blob.Key)
		var wg sync.WaitGroup
		var failed atomic.Int64
		for range 32 {
			wg.Go(func() {
				for k := range keys {
					h := c.Open(k, cache.Plan{Origin: src})
					p := make([]byte, len(src.blobs[k]))
					n, err := h.ReadAt(context.Background(), p, 0)
					h.Close()
					if (err != nil && err != io.EOF) || n != len(p) || !bytes.Equal(p, src.blobs[k]) {
						if failed.Add(1) <= 3 {
							t.Logf("fill %s: %d of %d bytes: %v", k, n, len(p), err)
						}
					}
				}
			})
		}
		for k := range src.blobs {
			keys <- k
		}
		close(keys)
		wg.Wait()
		if err := c.Close(); err != nil {
			t.Fatalf("close the filled cache: %v", err)
		}
		if failed.Load() > 0 {
			t.Fatalf("%d blobs failed to fill", failed.Load())
		}
		for k := range src.blobs {
			if err := os.Rename(filepath.Join(dir, "blobs", blob.AlgSHA256, k.Hex()), filepath.Join(final, k.Hex())); err != nil {
				t.Fatal(err)
			}
		}
	}
	return byDigest
}

// TestLoadTenThousandBlobs: peerd starts on a cache of 10,000 small blobs;
// the start time to /healthz and /readyz, its RSS, and (as root with
// /dev/fuse) the time to list the mount's sha256/ folder are measured, and
// every blob is listed and a sample read back.
func TestLoadTenThousandBlobs(t *testing.T) {
	loadSkipShort(t)
	const (
		count = 10000
		// nofile is the fd limit peerd runs with: below two files per
		// cached blob, so a node that opened each blob at start would
		// run out.
		nofile = 16384
	)
	dataDir := t.TempDir()
	t0 := time.Now()
	blobs := fillCache(t, dataDir, count, 1<<20)
	fill := time.Since(t0)

	origin := NewOrigin(t, "") // allowed, holds nothing: reads must be hits
	o := NodeOpts{DataDir: dataDir, Args: []string{"--upstream-allow", origin.Host, "--chunk-size", "1MiB"}}
	mount := ""
	if _, err := os.Stat("/dev/fuse"); err == nil && os.Geteuid() == 0 {
		mount = fuseMountDir(t)
		o.Mount = mount
	} else {
		t.Logf("not listing the FUSE mount: needs root and /dev/fuse (euid %d, /dev/fuse: %v)", os.Geteuid(), err)
	}
	t0 = time.Now()
	n := startNodeNoFile(t, o, nofile) // returns once /healthz answers 200
	healthy := time.Since(t0)
	waitReady(t, n)
	ready := time.Since(t0)
	rss := procStatusKiB(t, n.PID(), "VmRSS")

	// Every blob is in the cache's list (the metric), and a sample reads
	// back through /blobs/ without asking the origin.
	if got := n.Metric(t, "peerd_cache_blobs"); got != count {
		t.Errorf("peerd_cache_blobs = %v, want %d", got, count)
	}
	sample := 0
	for dg, b := range blobs {
		if sample == 50 {
			break
		}
		sample++
		code, _, body := Get(t, "GET", n.URL("/blobs/"+origin.URL+storagePath(dg)), nil)
		if code != 200 || !bytes.Equal(body, b) {
			t.Fatalf("GET %s: status %d, %d bytes of %d", dg, code, len(body), len(b))
		}
	}
	if origin.Requests.Load() != 0 {
		t.Errorf("reading cached blobs sent %d requests to the origin", origin.Requests.Load())
	}

	lsFig := "FUSE listing skipped (needs root and /dev/fuse)"
	if mount != "" {
		fuseWaitMounted(t, mount)
		t0 = time.Now()
		des, err := os.ReadDir(filepath.Join(mount, "sha256"))
		ls := time.Since(t0)
		if err != nil {
			t.Fatalf("list the mount: %v", err)
		}
		listed := map[string]bool{}
		for _, de := range des {
			listed["sha256:"+de.Name()] = true
		}
		for dg := range blobs {
			if !listed[dg] {
				t.Fatalf("%s missing from the mount's listing (%d entries)", dg, len(des))
			}
		}
		t0 = time.Now()
		des, err = os.ReadDir(filepath.Join(mount, "sha256"))
		ls2 := time.Since(t0)
		if err != nil || len(des) < count {
			t.Fatalf("second listing: %d entries, %v", len(des), err)
		}
		sample = 0
		for dg, b := range blobs {
			if sample == 50 {
				break
			}
			sample++
			got, err := os.ReadFile(fuseBlobPath(mount, dg))
			if err != nil || !bytes.Equal(got, b) {
				t.Fatalf("read %s under the mount: %v, %d bytes of %d", dg, err, len(got), len(b))
			}
		}
		lsFig = fmt.Sprintf("readdir of the mount's sha256/ %s (%d entries; again %s)", ms(ls), len(des), ms(ls2))
	}
	rssAfter := procStatusKiB(t, n.PID(), "VmRSS")
	t.Logf("filled %d blobs in %s; start to /healthz %s, to /readyz %s; RSS %d MiB after start, %d MiB after the reads; %s",
		count, fill.Round(time.Millisecond), ms(healthy), ms(ready), rss>>10, rssAfter>>10, lsFig)
	if t.Failed() {
		return
	}
	reliability.Record(t, reliability.Row{Area: "load",
		Case:    fmt.Sprintf("peerd starts on a cache of %d small blobs, RLIMIT_NOFILE %d", count, nofile),
		Outcome: "all listed, a sample reads back with no origin request",
		Figure: fmt.Sprintf("start to /healthz %s, to /readyz %s; RSS %d MiB; %s",
			ms(healthy), ms(ready), rss>>10, lsFig)})
}
