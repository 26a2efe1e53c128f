package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/p2p"
)

// oneByteStore is an in-process node's local store: every key it holds is
// a one-byte blob, so a fetch costs the data plane's round trip and nothing
// more.
type oneByteStore struct {
	mu   sync.Mutex
	keys map[blob.Key]bool
}

func (s *oneByteStore) add(k blob.Key) {
	s.mu.Lock()
	s.keys[k] = true
	s.mu.Unlock()
}

func (s *oneByteStore) OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	s.mu.Lock()
	ok := s.keys[k]
	s.mu.Unlock()
	if !ok || off != 0 {
		return nil, -1, blob.ErrNotFound
	}
	return io.NopCloser(bytes.NewReader([]byte{1})), 1, nil
}

type peerdNode struct {
	n     *p2p.Node
	reg   *prometheus.Registry
	store *oneByteStore
}

type kadNode struct {
	h host.Host
	d *dht.IpfsDHT
}

func randomKey() blob.Key {
	var r [32]byte
	rand.Read(r[:])
	sum := sha256.Sum256(r[:])
	return blob.Key("sha256:" + hex.EncodeToString(sum[:]))
}

// labelled is every sample of reg's metric name that has label l=v.
func labelled(reg *prometheus.Registry, name, l, v string) []*dto.Metric {
	mfs, err := reg.Gather()
	if err != nil {
		return nil
	}
	var out []*dto.Metric
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if hasLabel(m, l, v) {
				out = append(out, m)
			}
		}
	}
	return out
}

// counterSum sums a counter of a registry over samples with label l=v.
func counterSum(reg *prometheus.Registry, name, l, v string) float64 {
	var sum float64
	for _, m := range labelled(reg, name, l, v) {
		sum += m.GetCounter().GetValue()
	}
	return sum
}

// histCount is the number of observations of a histogram with label l=v.
func histCount(reg *prometheus.Registry, name, l, v string) uint64 {
	var sum uint64
	for _, m := range labelled(reg, name, l, v) {
		sum += m.GetHistogram().GetSampleCount()
	}
	return sum
}

// histBelow is the number of observations of a histogram with label l=v
// that fell in buckets whose upper bound is at most le.
func histBelow(reg *prometheus.Registry, name, l, v string, le float64) uint64 {
	var n uint64
	for _, m := range labelled(reg, name, l, v) {
		var best uint64
		for _, b := range m.GetHistogram().GetBucket() {
			if b.GetUpperBound() <= le {
				best = max(best, b.GetCumulativeCount())
			}
		}
		n += best
	}
	return n
}

func hasLabel(m *dto.Metric, l, v string) bool {
	for _, lp := range m.GetLabel() {
		if lp.GetName() == l && lp.GetValue() == v {
			return true
		}
	}
	return false
}

// processRSS is this process's resident memory in MiB.
func processRSS() float64 {
	v, _ := rssMiB(os.Getpid(), "VmRSS")
	return v
}

// keyCase is a key and the nodes (by index) that hold it; the same layout
// is used in both networks.
type keyCase struct {
	k       blob.Key
	c       cid.Cid
	holders []int
}

// notFound stands for a lookup that found no provider among the times to
// the first provider: it sorts last, so a quantile that lands on a lost
// lookup says so instead of leaving it out.
const notFound = time.Duration(math.MaxInt64)

func countLost(d []time.Duration) int {
	n := 0
	for _, v := range d {
		if v == notFound {
			n++
		}
	}
	return n
}

func lookupMs(d time.Duration) string {
	if d == notFound {
		return "not found"
	}
	return ms(d)
}

// dhtTimes are the figures of one network.
type dhtTimes struct {
	first1, first10 []time.Duration // time to first provider, 1 and 10 providers
	fetch1, fetch10 []time.Duration // peerd only: first fetch minus a warm fetch
	miss            []time.Duration
	failed          int
	perNode         float64 // MiB of RSS per node
}

// benchDHT is row 5: discovery in a DHT of c.dhtNodes nodes built in this
// process with peerd's p2p package, next to a network of the same size of
// plain kad-dht nodes. Both networks hold the same key layout and are asked
// by the same node indexes. They run one after the other (kad-dht, peerd,
// kad-dht again): with both ends of every connection in this process, two
// meshes of 100 nodes at once would need more descriptors than a process is
// usually allowed.
func benchDHT(ctx context.Context, c *config, t *table) error {
	if c.dhtNodes == 0 {
		return nil
	}
	if c.dhtNodes < 12 {
		return errors.New("BENCH_DHT_NODES: want at least 12 (10 providers and an asker)")
	}
	N, K := c.dhtNodes, c.dhtKeys
	mk := func(providers int) ([]keyCase, error) {
		out := make([]keyCase, K)
		for i := range out {
			k := randomKey()
			cc, err := p2p.KeyToCID(k)
			if err != nil {
				return nil, err
			}
			out[i] = keyCase{k: k, c: cc, holders: mrand.Perm(N)[:providers]}
		}
		return out, nil
	}
	one, err := mk(1)
	if err != nil {
		return err
	}
	ten, err := mk(10)
	if err != nil {
		return err
	}
	// The askers are nodes of this process (the first part of each
	// network), the same indexes in both networks.
	askers := mrand.Perm(min(N, c.dhtPerProcess))[:5]
	// Every node also holds a warm-up key of its own: peerd's askers fetch
	// them to open their data-plane connections before the timed fetches.
	// Both networks store the same records: warm-up keys and every key of
	// both halves.
	warm := make([]keyCase, N)
	for i := range warm {
		k := randomKey()
		cc, err := p2p.KeyToCID(k)
		if err != nil {
			return err
		}
		warm[i] = keyCase{k: k, c: cc, holders: []int{i}}
	}
	records := append(append(append([]keyCase{}, warm...), one...), ten...)

	// kad-dht runs before and after peerd, on half the keys each time, so
	// that a burst of load from elsewhere during one phase does not land on
	// one side only.
	half := func(cs []keyCase, second bool) []keyCase {
		if second {
			return cs[len(cs)/2:]
		}
		return cs[:len(cs)/2]
	}
	kt, err := kadDHT(ctx, c, t, records, half(one, false), half(ten, false), askers)
	if err != nil {
		return err
	}
	pt, err := peerdDHT(ctx, c, t, warm, one, ten, askers)
	if err != nil {
		return err
	}
	kt2, err := kadDHT(ctx, c, t, records, half(one, true), half(ten, true), askers)
	if err != nil {
		return err
	}
	kt.first1, kt.first10 = append(kt.first1, kt2.first1...), append(kt.first10, kt2.first10...)
	kt.miss, kt.failed = append(kt.miss, kt2.miss...), kt.failed+kt2.failed
	for _, v := range []struct {
		label string
		p, k  []time.Duration
		f     []time.Duration
	}{{"1 provider", pt.first1, kt.first1, pt.fetch1}, {"10 providers", pt.first10, kt.first10, pt.fetch10}} {
		for _, q := range []struct {
			name string
			p    float64
		}{{"p50", .5}, {"p99", .99}} {
			p, k := quantile(v.p, q.p), quantile(v.k, q.p)
			r := row{group: "5", what: fmt.Sprintf("discovery, %d nodes: first provider %s, %s (%d keys, not found: peerd %d, kad-dht %d)",
				N, q.name, v.label, len(v.p), countLost(v.p), countLost(v.k)),
				peerd: lookupMs(p), baseline: lookupMs(k) + " kad-dht", goal: "≤ 1.2×", verdict: "MISSED"}
			if p != notFound && k != notFound {
				rt := float64(p) / float64(max(k, 1))
				r.ratio, r.verdict = fmt.Sprintf("%.2f", rt), atMost(rt, 1.2)
			}
			t.add(r)
		}
		t.add(row{group: "5", what: fmt.Sprintf("(diagnostic) %s: discovery as a fetch feels it (first fetch minus a warm fetch), p50 / p99", v.label),
			peerd: ms(quantile(v.f, .5)) + " / " + ms(quantile(v.f, .99))})
	}
	t.add(row{group: "5", what: fmt.Sprintf("discovery, %d nodes: memory per node (RSS growth of the processes hosting them ÷ nodes)", N),
		peerd: fmt.Sprintf("%.1f MiB", pt.perNode), baseline: fmt.Sprintf("%.1f MiB kad-dht", kt.perNode)})
	t.add(row{group: "5", what: fmt.Sprintf("discovery, %d nodes: miss (nobody holds the key), p50 / p99", N),
		peerd:    ms(quantile(pt.miss, .5)) + " / " + ms(quantile(pt.miss, .99)),
		baseline: ms(quantile(kt.miss, .5)) + " / " + ms(quantile(kt.miss, .99)) + " kad-dht",
		ratio:    fmt.Sprintf("%.2f", float64(quantile(pt.miss, .5))/float64(max(quantile(kt.miss, .5), 1)))})
	return nil
}

// peerdDHT builds the network of peerd p2p nodes and measures it.
func peerdDHT(ctx context.Context, c *config, t *table, warm, one, ten []keyCase, askers []int) (dhtTimes, error) {
	var res dhtTimes
	N := c.dhtNodes
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	net, err := startNet(ctx, c, "peerd", 1, N)
	if err != nil {
		return res, err
	}
	defer net.close()
	pn := net.local.pn
	L := net.localSize()
	// Like the kad-dht network below: every node refreshes its routing
	// table once the whole network is up (a node's own refresh after
	// joining saw only the nodes started before it).
	if err := net.refresh(ctx); err != nil {
		return res, err
	}
	if err := net.waitTables(ctx, t, "peerd", min(N-1, 10)); err != nil {
		return res, err
	}
	if res.perNode, _, err = net.usage(ctx); err != nil {
		return res, err
	}
	start := time.Now()
	expected, err := net.provide(ctx, append(append(append([]keyCase{}, warm...), one...), ten...))
	if err != nil {
		return res, err
	}
	t.note("row 5: %d peerd nodes advertised %d keys in %v", N, expected, time.Since(start).Round(time.Millisecond))

	fetch := func(asker int, k blob.Key) (time.Duration, error) {
		fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
		defer fcancel()
		start := time.Now()
		rc, _, err := pn[asker].n.Source().Fetch(fctx, k, 0, 1)
		if err != nil {
			return time.Since(start), err
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		return time.Since(start), err
	}
	warmLost, warmErr := 0, 0
	var firstErr error
	for _, a := range askers {
		for i, kc := range warm {
			if i != a {
				if _, err := fetch(a, kc.k); errors.Is(err, blob.ErrNotFound) {
					warmLost++
				} else if err != nil {
					warmErr++
					firstErr = cmp.Or(firstErr, err)
				}
			}
		}
	}
	if warmLost+warmErr > 0 {
		t.note("row 5: of %d warm-up fetches, %d found no provider and %d failed otherwise (%v); their connections open during the timed fetches",
			len(askers)*(N-1), warmLost, warmErr, firstErr)
	}
	// The time to the first provider is what a Fetch waits for discovery:
	// Source.Providers on a key the asker has not looked up. The same key
	// is then fetched by another asker, twice: the first fetch minus the
	// second (which hits that asker's provider cache) is discovery as the
	// fetch feels it, including the lookup's tail competing with the data
	// request for the same two cores (on real nodes half of that work, the
	// answering side, runs elsewhere).
	// Lookups of one-provider keys that found nobody, by the process
	// hosting the provider (0: the driver).
	lostBy := map[int]int{}
	measure := func(cases []keyCase) (first, fetched []time.Duration) {
		for i, kc := range cases {
			pick := func(j int) int {
				a := askers[j%len(askers)]
				for slicesContains(kc.holders, a) {
					a = (a + 1) % L
				}
				return a
			}
			a, b := pick(i), pick(i+1)
			fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
			start := time.Now()
			ps := pn[a].n.Source().Providers(fctx, kc.k)
			d := time.Since(start)
			fcancel()
			if len(ps) == 0 {
				res.failed++
				first = append(first, notFound)
				if len(kc.holders) == 1 {
					lostBy[net.partOf(kc.holders[0])]++
				}
				continue
			}
			first = append(first, d)
			if b == a {
				continue
			}
			t1, err := fetch(b, kc.k)
			if err != nil {
				continue
			}
			t2, err := fetch(b, kc.k)
			if err != nil {
				continue
			}
			fetched = append(fetched, max(0, t1-t2))
		}
		return
	}
	stop := profileCPU(c, "dht-peerd.pprof")
	res.first1, res.fetch1 = measure(one)
	res.first10, res.fetch10 = measure(ten)
	stop()
	for i := 0; i < min(c.dhtKeys, 50); i++ {
		d, err := fetch(askers[i%len(askers)], randomKey())
		if err == nil {
			return res, errors.New("fetch of a key nobody holds succeeded")
		}
		res.miss = append(res.miss, d)
	}
	if len(lostBy) > 0 {
		t.note("row 5: one-provider keys peerd found no provider for, by the process hosting the provider: %v (of %d processes)", lostBy, len(net.parts))
	}
	net.noteFds(ctx, t, "after the lookups")
	var found, notFound, ended uint64
	for _, a := range askers {
		found += histCount(pn[a].reg, "peerd_p2p_lookup_seconds", "result", "found")
		notFound += histCount(pn[a].reg, "peerd_p2p_lookup_seconds", "result", "not_found")
		ended += histBelow(pn[a].reg, "peerd_p2p_lookup_seconds", "result", "not_found", 0.8*c.dhtResolve.Seconds())
	}
	t.note("row 5: the askers' peerd DHT lookup tries (peerd_p2p_lookup_seconds): %d found a provider, %d found none, of which %d ended before 0.8 × the %v resolve timeout (%d misses were asked)",
		found, notFound, ended, c.dhtResolve, min(c.dhtKeys, 50))
	return res, peerdAtScale(ctx, c, t, pn, N)
}

// kadDHT builds a network of plain kad-dht nodes and measures it the same way.
func kadDHT(ctx context.Context, c *config, t *table, records, one, ten []keyCase, askers []int) (dhtTimes, error) {
	var res dhtTimes
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	net, err := startNet(ctx, c, "kad", 2, c.dhtNodes)
	if err != nil {
		return res, err
	}
	defer net.close()
	kn, L := net.local.kn, net.localSize()
	if err := net.refresh(ctx); err != nil {
		return res, err
	}
	if err := net.waitTables(ctx, t, "kad-dht", min(c.dhtNodes-1, 10)); err != nil {
		return res, err
	}
	if res.perNode, _, err = net.usage(ctx); err != nil {
		return res, err
	}
	if _, err := net.provide(ctx, records); err != nil {
		return res, err
	}
	first := func(asker int, cc cid.Cid) (time.Duration, bool) {
		fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
		defer fcancel()
		start := time.Now()
		ch := kn[asker].d.FindProvidersAsync(fctx, cc, 1)
		if _, ok := <-ch; !ok {
			return 0, false
		}
		d := time.Since(start)
		fcancel()
		for range ch {
		}
		return d, true
	}
	measure := func(cases []keyCase) (out []time.Duration) {
		for i, kc := range cases {
			asker := askers[i%len(askers)]
			for slicesContains(kc.holders, asker) {
				asker = (asker + 1) % L
			}
			if d, ok := first(asker, kc.c); ok {
				out = append(out, d)
			} else {
				res.failed++
				out = append(out, notFound)
			}
		}
		return
	}
	stop := profileCPU(c, "dht-kad.pprof")
	res.first1 = measure(one)
	res.first10 = measure(ten)
	stop()
	for i := 0; i < min(c.dhtKeys, 50)/2; i++ {
		cc, _ := p2p.KeyToCID(randomKey())
		fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
		start := time.Now()
		for range kn[askers[i%len(askers)]].d.FindProvidersAsync(fctx, cc, 1) {
		}
		res.miss = append(res.miss, time.Since(start))
		fcancel()
	}
	net.noteFds(ctx, t, "after the lookups")
	return res, ctx.Err()
}

// profileCPU profiles this process into BENCH_PPROF/name (when set) until
// the returned function is called. A second profile of the same name (the
// kad-dht network runs twice) gets a "2." prefix.
func profileCPU(c *config, name string) func() {
	if c.pprof == "" {
		return func() {}
	}
	path := filepath.Join(c.pprof, name)
	if _, err := os.Stat(path); err == nil {
		path = filepath.Join(c.pprof, "2."+name)
	}
	f, err := os.Create(path)
	if err != nil {
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}

func slicesContains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// peerdAtScale starts a real peerd process in the network of size nodes,
// makes every node of this process (pn) connect to it and reads its RSS
// with that many peers; then row 4 measures a miss through it.
func peerdAtScale(ctx context.Context, c *config, t *table, pn []*peerdNode, size int) error {
	boot := fmt.Sprintf("%s/p2p/%s", pn[0].n.Addrs()[0], pn[0].n.ID())
	o, err := startOrigin(ctx, c, "origin-dht")
	if err != nil {
		return err
	}
	defer o.fs.Stop()
	args := append([]string{"--bootstrap", boot, "--upstream-allow", o.host()}, strings.Fields(os.Getenv("BENCH_PEER_ARGS"))...)
	n, err := startNode(ctx, c, filepath.Join(c.work, "dht-peerd"), nodeOpts{args: args})
	if err != nil {
		return err
	}
	defer n.Stop()
	if err := n.waitReady(ctx, 30*time.Second); err != nil {
		return err
	}
	ai, err := peer.AddrInfoFromString(n.P2PAddr)
	if err != nil {
		return err
	}
	for _, x := range pn {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		x.n.Connect(cctx, *ai)
		cancel()
	}
	if err := sleep(ctx, 5*time.Second); err != nil {
		return err
	}
	peers, err := n.metric(ctx, "peerd_p2p_connected_peers")
	if err != nil {
		return err
	}
	rss, err := rssMiB(n.PID(), "VmRSS")
	if err != nil {
		return err
	}
	hwm, _ := rssMiB(n.PID(), "VmHWM")
	t.add(row{group: "5", what: fmt.Sprintf("discovery: RSS of a peerd process connected to %.0f peers (peak %.1f MiB; %s)", peers, hwm, rssParts(n.PID())),
		peerd: fmt.Sprintf("%.1f MiB", rss), goal: "≤ 64 MiB", verdict: atMost(rss, 64)})
	return missTTFB(ctx, c, t, o, n, fmt.Sprintf("a peerd in the %d-node DHT", size))
}
