package itest

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// peerID runs `peerd id` on a data dir (creating the key) and returns the ID.
func peerID(t testing.TB, dir string) string {
	t.Helper()
	out, err := exec.Command(peerdBin, "id", "--data-dir", dir).Output()
	if err != nil {
		t.Fatalf("peerd id: %v", err)
	}
	id := strings.TrimSpace(string(out))
	if !strings.HasPrefix(id, "12D3KooW") {
		t.Fatalf("peerd id printed %q", id)
	}
	return id
}

// p2pNode starts a node with a fixed libp2p port and peer port, so tests can
// bootstrap from it and knock on its peer port.
type p2pNode struct {
	*Node
	ID       string
	P2PAddr  string // full multiaddr with /p2p/<id>
	PeerAddr string
}

func startP2PNode(t testing.TB, extra ...string) *p2pNode {
	t.Helper()
	ip := NextIP()
	dir := t.TempDir()
	id := peerID(t, dir)
	port := FreePort(t, ip)
	peerPort := FreePort(t, ip)
	args := append([]string{
		"--p2p-addr", fmt.Sprintf("/ip4/%s/tcp/%d", ip, port),
		"--peer-addr", fmt.Sprintf("%s:%d", ip, peerPort),
	}, extra...)
	n := StartNode(t, NodeOpts{IP: ip, DataDir: dir, Args: args})
	return &p2pNode{Node: n, ID: id,
		P2PAddr:  fmt.Sprintf("/ip4/%s/tcp/%d/p2p/%s", ip, port, id),
		PeerAddr: fmt.Sprintf("%s:%d", ip, peerPort)}
}

// patient returns args after flags that let a node wait for its DHT
// lookups, and a cold read's first chunk for the first of them, instead of
// going to the origin after the defaults' 20 ms (--resolve-timeout) and
// 10 ms (--miss-hedge). Tests that assert a node takes nothing from the
// origin while a peer holds the blob use it: on a loaded machine a lookup
// in a three-node network can take longer than the defaults, and then the
// first chunk rightly comes from the origin. The hedge itself is
// unit-tested in p2p (swarm_test.go).
func patient(args ...string) []string {
	return append([]string{"--resolve-timeout=5s", "--miss-hedge=5s"}, args...)
}

func waitReady(t testing.TB, n *Node) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(n.URL("/readyz"))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready within 30s", n.Name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// rangeRead reads url in chunk-sized Range requests and returns the bytes.
// between runs after each chunk (to kill a node mid-way).
func rangeRead(t testing.TB, url string, size, chunk int64, between func(off int64)) []byte {
	t.Helper()
	out := make([]byte, 0, size)
	for off := int64(0); off < size; off += chunk {
		end := min(off+chunk, size) - 1
		code, _, body := Get(t, "GET", url, map[string]string{"Range": fmt.Sprintf("bytes=%d-%d", off, end)})
		if code != http.StatusPartialContent || int64(len(body)) != end-off+1 {
			t.Fatalf("GET %s bytes %d-%d: status %d, %d bytes", url, off, end, code, len(body))
		}
		out = append(out, body...)
		if between != nil {
			between(off)
		}
	}
	return out
}

func TestP2PThreeNodesShareABlob(t *testing.T) {
	origin := NewOrigin(t, "")
	allow := "--upstream-allow=" + origin.Host
	const size = 24<<20 + 12345
	data, dg := RandomBlob(t, size)
	url := origin.Put(storagePath(dg), data)

	a := startP2PNode(t, patient(allow)...)
	b := startP2PNode(t, patient(allow, "--bootstrap", a.P2PAddr)...)
	c := startP2PNode(t, patient(allow, "--bootstrap", a.P2PAddr)...)
	for _, n := range []*p2pNode{a, b, c} {
		waitReady(t, n.Node)
	}
	waitMetric(t, a.Node, "peerd_p2p_connected_peers", 2)

	// A reads the blob from the origin and advertises it.
	code, _, body := Get(t, "GET", a.URL("/blobs/"+url), nil)
	if code != 200 || Digest(body) != dg {
		t.Fatalf("A: status %d, digest %s, want %s", code, Digest(body), dg)
	}
	fromOrigin := origin.Sent.Load()
	if fromOrigin < size {
		t.Fatalf("origin sent %d bytes for A, want >= %d", fromOrigin, size)
	}
	waitMetric(t, a.Node, "peerd_p2p_provides_total", 1, "result=ok")

	// B reads it in 1 MiB ranges: from A, (almost) nothing from the origin.
	got := rangeRead(t, b.URL("/blobs/"+url), size, 1<<20, nil)
	if Digest(got) != dg {
		t.Fatalf("B read wrong bytes: %s", Digest(got))
	}
	if extra := origin.Sent.Load() - fromOrigin; extra > size/100 {
		t.Fatalf("B took %d of %d bytes from the origin, want <= 1%%", extra, size)
	}
	if got := b.Metric(t, "peerd_p2p_received_bytes_total"); got < size*0.99 {
		t.Fatalf("B received %v bytes from peers, want ~%d", got, size)
	}
	if got := a.Metric(t, "peerd_p2p_served_bytes_total"); got < size*0.99 {
		t.Fatalf("A served %v bytes to peers, want ~%d", got, size)
	}
	// Connections to A were kept alive: far fewer TLS handshakes than chunks.
	if dials := b.Metric(t, "peerd_p2p_data_connections_total"); dials < 1 || dials > 16 {
		t.Errorf("B opened %v data-plane connections for 25 chunks, want a few reused ones", dials)
	} else {
		t.Logf("B read 25 chunks from A over %v kept-alive TLS connections", dials)
	}
	if _, _, m := Get(t, "GET", b.URL("/metrics/prometheus"), nil); !bytes.Contains(m, []byte("\nlibp2p_")) || !bytes.Contains(m, []byte("peerd_p2p_lookup_seconds_bucket")) {
		t.Error("metrics lack libp2p_* or peerd_p2p_lookup_seconds")
	}
	// B verified the blob (its peer bytes may now spread) and advertises it.
	waitMetric(t, b.Node, "peerd_cache_verifications_total", 1, "result=ok")
	waitMetric(t, b.Node, "peerd_p2p_provides_total", 1, "result=ok")

	// A second blob that only A holds: B and C read it at the same time and
	// A dies a quarter of the way in. Their partial copies are unverified
	// peer bytes, which are never passed on, so both finish from the origin:
	// each chunk either fetches from it themselves, or one fetches it and
	// shares it with the other (swarming), so the origin sends at least
	// what each of them did not get from A.
	data2, dg2 := RandomBlob(t, size)
	url2 := origin.Put(storagePath(dg2), data2)
	if code, _, body := Get(t, "GET", a.URL("/blobs/"+url2), nil); code != 200 || Digest(body) != dg2 {
		t.Fatalf("A blob 2: status %d", code)
	}
	waitMetric(t, a.Node, "peerd_p2p_provides_total", 2, "result=ok")
	fromOrigin = origin.Sent.Load()
	recvB0, recvC0 := b.Metric(t, "peerd_p2p_received_bytes_total"), c.Metric(t, "peerd_p2p_received_bytes_total")
	servB0, servC0 := b.Metric(t, "peerd_p2p_served_bytes_total"), c.Metric(t, "peerd_p2p_served_bytes_total")
	// How B and C noticed A's loss: a dial or read of A that failed or
	// stalled, or a transfer resumed from another provider. (Hedges and
	// not_found answers happen without any loss, so they do not count.)
	lossSignals := func() float64 {
		sum := 0.0
		for _, n := range []*p2pNode{b, c} {
			for _, kind := range []string{"dial", "read", "timeout"} {
				sum += n.Metric(t, "peerd_p2p_peer_errors_total", "kind="+kind)
			}
			sum += n.Metric(t, "peerd_p2p_resumed_transfers_total")
		}
		return sum
	}
	loss0 := lossSignals()
	quarter := make(chan struct{}, 2)
	type result struct {
		name string
		dg   string
	}
	results := make(chan result, 2)
	for _, n := range []*p2pNode{b, c} {
		go func() {
			// rangeRead fails the test with t.Fatal, which ends only this
			// goroutine: the deferred send keeps the test from hanging.
			res := result{n.Name, "read failed"}
			defer func() { results <- res }()
			signalled := false
			got := rangeRead(t, n.URL("/blobs/"+url2), size, 1<<20, func(off int64) {
				if !signalled && off >= size/4 {
					signalled = true
					quarter <- struct{}{}
					time.Sleep(50 * time.Millisecond)
				}
			})
			res.dg = Digest(got)
		}()
	}
	<-quarter
	a.Kill()
	for i := 0; i < 2; i++ {
		r := <-results
		if r.dg != dg2 {
			t.Fatalf("%s read wrong bytes of blob 2 after A died: %s", r.name, r.dg)
		}
	}
	// What each got from A: what it received minus what the other served.
	fromAB := b.Metric(t, "peerd_p2p_received_bytes_total") - recvB0 - (c.Metric(t, "peerd_p2p_served_bytes_total") - servC0)
	fromAC := c.Metric(t, "peerd_p2p_received_bytes_total") - recvC0 - (b.Metric(t, "peerd_p2p_served_bytes_total") - servB0)
	// The bound below means something only if A died while both still
	// needed it: each got from A between nothing and less than the blob
	// (a chunk of slack). A count outside that is a broken measurement,
	// and a bound at or below zero would pass whatever the origin sent.
	for _, got := range []struct {
		name string
		n    float64
	}{{b.Name, fromAB}, {c.Name, fromAC}} {
		if got.n < 0 || got.n > size-(1<<20) {
			t.Fatalf("%s got %.0f bytes of blob 2 from A, want 0..%d: A did not die mid-way, or the byte counts are wrong", got.name, got.n, size-(1<<20))
		}
	}
	need := size - max(fromAB, fromAC) - (1 << 20)
	if extra := origin.Sent.Load() - fromOrigin; float64(extra) < need {
		t.Errorf("after A died the origin sent only %d bytes of blob 2, B got %.0f and C %.0f from A; who served the rest?", extra, fromAB, fromAC)
	}
	// The readers noticed A's loss (a failed dial or read of A, or a
	// resume) rather than, say, having had blob 2 whole before it died.
	if n := lossSignals() - loss0; n < 1 {
		t.Errorf("B and C finished blob 2 after A died without a failed dial or read of a peer, or a resume")
	}
	t.Logf("blob 2 after A died: origin sent %d bytes, B got %.0f and C %.0f from A; failed peer dials/reads + resumes on B and C: %.0f",
		origin.Sent.Load()-fromOrigin, fromAB, fromAC, lossSignals()-loss0)

	// C reads the first blob: A is dead, B holds it verified.
	fromOrigin = origin.Sent.Load()
	servedByB := b.Metric(t, "peerd_p2p_served_bytes_total")
	got = rangeRead(t, c.URL("/blobs/"+url), size, 1<<20, nil)
	if Digest(got) != dg {
		t.Fatalf("C read wrong bytes: %s", Digest(got))
	}
	if extra := origin.Sent.Load() - fromOrigin; extra > size/100 {
		t.Errorf("C took %d of %d bytes from the origin with B holding the blob, want <= 1%%", extra, size)
	}
	if got := b.Metric(t, "peerd_p2p_served_bytes_total") - servedByB; got < size*0.99 {
		t.Errorf("B served C only %v bytes", got)
	}
	t.Logf("C: peer errors %v, resumed %v, hedged %v", c.Metric(t, "peerd_p2p_peer_errors_total"),
		c.Metric(t, "peerd_p2p_resumed_transfers_total"), c.Metric(t, "peerd_p2p_hedged_requests_total"))

	// A non-member gets no bytes from a peer port: neither plain HTTP nor
	// TLS without a libp2p certificate.
	for _, u := range []string{"http://" + b.PeerAddr + "/blobs/" + dg, "https://" + b.PeerAddr + "/blobs/" + dg} {
		cl := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
		resp, err := cl.Get(u)
		if err != nil {
			continue // refused at the handshake
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode/100 == 2 || bytes.Contains(body, data[:64]) {
			t.Fatalf("non-member GET %s: %s with %d bytes", u, resp.Status, len(body))
		}
	}

	for _, n := range []*p2pNode{b, c} {
		p50, p99, cnt := histQuantiles(t, n.Node, "peerd_p2p_lookup_seconds", "result=found")
		t.Logf("%s FindProviders (found): %d lookups, p50 <= %v, p99 <= %v (histogram bucket bounds)", n.Name, cnt, p50, p99)
	}
}

func TestP2PSwarmKeyKeepsOutsiders(t *testing.T) {
	origin := NewOrigin(t, "")
	allow := "--upstream-allow=" + origin.Host
	const size = 4<<20 + 7
	data, dg := RandomBlob(t, size)
	url := origin.Put(storagePath(dg), data)

	dir := t.TempDir()
	key := func(name string) string {
		b := make([]byte, 32)
		rand.Read(b)
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("/key/swarm/psk/1.0.0/\n/base16/\n"+hex.EncodeToString(b)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	k1, k2 := key("k1"), key("k2")
	a := startP2PNode(t, allow, "--swarm-key-file", k1)
	b := startP2PNode(t, patient(allow, "--swarm-key-file", k1, "--bootstrap", a.P2PAddr)...)
	outsider := startP2PNode(t, allow, "--swarm-key-file", k2, "--bootstrap", a.P2PAddr)
	waitReady(t, b.Node)

	if code, _, body := Get(t, "GET", a.URL("/blobs/"+url), nil); code != 200 || Digest(body) != dg {
		t.Fatalf("A: %d", code)
	}
	waitMetric(t, a.Node, "peerd_p2p_provides_total", 1, "result=ok")
	before := origin.Sent.Load()
	if code, _, body := Get(t, "GET", b.URL("/blobs/"+url), nil); code != 200 || Digest(body) != dg {
		t.Fatalf("B: %d", code)
	}
	if extra := origin.Sent.Load() - before; extra > 0 {
		t.Fatalf("member B took %d bytes from the origin", extra)
	}

	// The node with another key never joins: not ready, and it reads from
	// the origin only.
	if code, _, _ := Get(t, "GET", outsider.URL("/readyz"), nil); code == 200 {
		t.Fatal("outsider with another swarm key reports ready")
	}
	if got := outsider.Metric(t, "peerd_p2p_connected_peers"); got != 0 {
		t.Fatalf("outsider has %v connected peers", got)
	}
	before = origin.Sent.Load()
	if code, _, body := Get(t, "GET", outsider.URL("/blobs/"+url), nil); code != 200 || Digest(body) != dg {
		t.Fatalf("outsider: %d", code)
	}
	if extra := origin.Sent.Load() - before; extra < size {
		t.Fatalf("outsider took only %d bytes from the origin; peers served it", extra)
	}
	if got := outsider.Metric(t, "peerd_p2p_received_bytes_total"); got != 0 {
		t.Fatalf("outsider received %v bytes from peers", got)
	}
	_ = data
}

// TestP2PThroughput (PEERD_BENCH=1) compares node B reading a blob node A
// holds, through B's /blobs/ in 1 MiB ranges, with the same client reading
// the origin directly, and with B filling a blob nobody holds from the origin
// (the same cache writes without peers). PEERD_BENCH_MB sets the size
// (default 512), PEERD_BENCH_ROUNDS the rounds (default 3; medians are
// printed), PEERD_BENCH_PPROF a folder for CPU profiles of A and B.
func TestP2PThroughput(t *testing.T) {
	if os.Getenv("PEERD_BENCH") == "" {
		t.Skip("set PEERD_BENCH=1 to measure peer throughput")
	}
	mb := int64(512)
	if v := os.Getenv("PEERD_BENCH_MB"); v != "" {
		mb, _ = strconv.ParseInt(v, 10, 64)
	}
	rounds := 3
	if v := os.Getenv("PEERD_BENCH_ROUNDS"); v != "" {
		rounds, _ = strconv.Atoi(v)
	}
	size := mb << 20
	originDir := t.TempDir()
	originURL, stop := fileOrigin(t, "127.0.0.1", originDir)
	defer stop()
	allow := "--upstream-allow=" + strings.TrimPrefix(originURL, "http://")
	cacheSize := fmt.Sprintf("--cache-size=%dMiB", 2*mb+64)
	prof := os.Getenv("PEERD_BENCH_PPROF")
	var extra []string
	if prof != "" {
		extra = append(extra, "--debug-pprof")
	}
	a := startP2PNode(t, append([]string{allow, cacheSize}, extra...)...)
	b := startP2PNode(t, append([]string{allow, cacheSize, "--bootstrap", a.P2PAddr}, extra...)...)
	waitReady(t, b.Node)

	var direct, peer, cold, warm []float64
	var lat []time.Duration
	for r := 0; r < rounds; r++ {
		_, rel := writeRandomFile(t, originDir, size)
		provided := a.Metric(t, "peerd_p2p_provides_total", "result=ok")
		verified := a.Metric(t, "peerd_cache_verifications_total", "result=ok")
		sequentialRead(t, a.URL("/blobs/"+originURL+rel), size, 1<<20) // A fills from the origin
		waitMetric(t, a.Node, "peerd_p2p_provides_total", provided+1, "result=ok")
		waitMetric(t, a.Node, "peerd_cache_verifications_total", verified+1, "result=ok")
		_, relCold := writeRandomFile(t, originDir, size)
		fromOrigin := b.Metric(t, "peerd_fetched_bytes_total", "source=upstream")

		d, _ := sequentialRead(t, originURL+rel, size, 1<<20)
		var p, c float64
		var l []time.Duration
		readPeer := func() {
			var wg sync.WaitGroup
			if prof != "" && r == 0 {
				for _, n := range []*p2pNode{a, b} {
					wg.Add(1)
					go func() {
						defer wg.Done()
						saveProfile(t, n.Node, filepath.Join(prof, n.Name+".pprof"))
					}()
				}
			}
			p, l = sequentialRead(t, b.URL("/blobs/"+originURL+rel), size, 1<<20)
			wg.Wait()
		}
		readCold := func() { c, _ = sequentialRead(t, b.URL("/blobs/"+originURL+relCold), size, 1<<20) }
		if r%2 == 0 {
			readPeer()
			readCold()
		} else {
			readCold()
			readPeer()
		}
		w, _ := sequentialRead(t, b.URL("/blobs/"+originURL+rel), size, 1<<20)
		if got := b.Metric(t, "peerd_fetched_bytes_total", "source=upstream") - fromOrigin; got > float64(size)*1.01 {
			t.Errorf("round %d: B took %.0f bytes from the origin, want the cold blob only (%d) plus <= 1%%", r, got, size)
		}
		direct, peer, cold, warm = append(direct, d), append(peer, p), append(cold, c), append(warm, w)
		lat = append(lat, l...)
		os.Remove(filepath.Join(originDir, rel))
		os.Remove(filepath.Join(originDir, relCold))
	}
	recv := b.Metric(t, "peerd_p2p_received_bytes_total")
	p50, p99, cnt := histQuantiles(t, b.Node, "peerd_p2p_lookup_seconds", "")
	fmt.Printf("\npeer read of a %d MiB blob in 1 MiB ranges through B's /blobs/, A holding it; %d rounds, medians\n", mb, rounds)
	fmt.Printf("  origin direct          %6.0f MiB/s\n", median(direct))
	fmt.Printf("  B from A (peers)       %6.0f MiB/s  ratio %.2f (goal >= 0.8)  request p50 %v p99 %v\n", median(peer), median(ratio(peer, direct)), pct(lat, .5), pct(lat, .99))
	fmt.Printf("  B from origin (cold)   %6.0f MiB/s  ratio %.2f; peers vs this cold fill %.2f (both write B's cache)\n", median(cold), median(ratio(cold, direct)), median(ratio(peer, cold)))
	fmt.Printf("  B warm (cache hit)     %6.0f MiB/s\n", median(warm))
	fmt.Printf("  bytes from peers %.0f (%.2f%% of the peer-held blobs)\n", recv, 100*recv/float64(int64(rounds)*size))
	fmt.Printf("  lookups %d, p50 <= %v, p99 <= %v; hedged %.0f, peer errors %.0f, data connections %.0f\n", cnt, p50, p99,
		b.Metric(t, "peerd_p2p_hedged_requests_total"), b.Metric(t, "peerd_p2p_peer_errors_total"), b.Metric(t, "peerd_p2p_data_connections_total"))
}

func saveProfile(t testing.TB, n *Node, path string) {
	resp, err := http.Get(n.URL("/debug/pprof/profile?seconds=1"))
	if err != nil {
		t.Errorf("profile %s: %v", n.Name, err)
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		t.Errorf("profile %s: %v", n.Name, err)
		return
	}
	io.Copy(f, resp.Body)
	f.Close()
}

// histQuantiles estimates p50 and p99 of a Prometheus histogram as the upper
// bounds of the buckets they fall in.
func histQuantiles(t testing.TB, n *Node, name, label string) (time.Duration, time.Duration, int) {
	t.Helper()
	_, _, body := Get(t, "GET", n.URL("/metrics/prometheus"), nil)
	type bucket struct {
		le  float64
		cnt float64
	}
	agg := map[float64]float64{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"_bucket{") || (label != "" && !strings.Contains(line, strings.Replace(label, "=", `="`, 1)+`"`)) {
			continue
		}
		i := strings.Index(line, `le="`)
		j := strings.Index(line[i+4:], `"`)
		le, err := strconv.ParseFloat(line[i+4:i+4+j], 64)
		if err != nil {
			le = math.Inf(1)
		}
		v, _ := strconv.ParseFloat(strings.TrimSpace(line[strings.LastIndex(line, " "):]), 64)
		agg[le] += v
	}
	var bs []bucket
	for le, c := range agg {
		bs = append(bs, bucket{le, c})
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].le < bs[j].le })
	if len(bs) == 0 || bs[len(bs)-1].cnt == 0 {
		return 0, 0, 0
	}
	total := bs[len(bs)-1].cnt
	q := func(p float64) time.Duration {
		for _, b := range bs {
			if b.cnt >= p*total {
				if math.IsInf(b.le, 1) {
					return -1
				}
				return time.Duration(b.le * float64(time.Second))
			}
		}
		return -1
	}
	return q(0.5), q(0.99), int(total)
}

// TestP2PRestartReadvertises: a node restarted on its data advertises what
// its cache holds, and a peer whose only bootstrap peer went away reconnects.
func TestP2PRestartReadvertises(t *testing.T) {
	origin := NewOrigin(t, "")
	allow := "--upstream-allow=" + origin.Host
	const size = 6<<20 + 1
	data, dg := RandomBlob(t, size)
	url := origin.Put(storagePath(dg), data)

	a := startP2PNode(t, allow)
	if code, _, body := Get(t, "GET", a.URL("/blobs/"+url), nil); code != 200 || Digest(body) != dg {
		t.Fatalf("A: %d", code)
	}
	waitMetric(t, a.Node, "peerd_cache_verifications_total", 1, "result=ok")
	a.Restart()
	b := startP2PNode(t, patient(allow, "--bootstrap", a.P2PAddr)...)
	waitReady(t, b.Node)
	waitMetric(t, a.Node, "peerd_p2p_provides_total", 1, "result=ok")
	if got := a.Metric(t, "peerd_p2p_advertised_keys"); got != 1 {
		t.Fatalf("restarted A advertises %v keys, want 1", got)
	}
	before := origin.Sent.Load()
	if code, _, body := Get(t, "GET", b.URL("/blobs/"+url), nil); code != 200 || Digest(body) != dg {
		t.Fatalf("B: %d", code)
	}
	if extra := origin.Sent.Load() - before; extra != 0 {
		t.Fatalf("B took %d bytes from the origin though the restarted A holds the blob", extra)
	}

	// A goes away and comes back on the same address: B, which knew only A,
	// reconnects by itself.
	a.Restart()
	waitMetric(t, b.Node, "peerd_p2p_connected_peers", 1)
	waitReady(t, b.Node)
}
