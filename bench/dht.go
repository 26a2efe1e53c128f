package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
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

// counterSum sums a counter of a registry over samples with label l=v.
func counterSum(reg *prometheus.Registry, name, l, v string) float64 {
	mfs, err := reg.Gather()
	if err != nil {
		return 0
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if hasLabel(m, l, v) {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// histCount is the number of observations of a histogram with label l=v.
func histCount(reg *prometheus.Registry, name, l, v string) uint64 {
	mfs, err := reg.Gather()
	if err != nil {
		return 0
	}
	var sum uint64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if hasLabel(m, l, v) {
				sum += m.GetHistogram().GetSampleCount()
			}
		}
	}
	return sum
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

// benchDHT is row 5: discovery in a DHT of c.dhtNodes nodes in this process
// built with peerd's p2p package, next to a network of the same size of
// plain kad-dht nodes, interleaved key by key.
func benchDHT(ctx context.Context, c *config, t *table) error {
	if c.dhtNodes == 0 {
		return nil
	}
	if c.dhtNodes < 12 {
		return errors.New("BENCH_DHT_NODES: want at least 12 (10 providers and an asker)")
	}
	N := c.dhtNodes
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))

	runtime.GC()
	debug.FreeOSMemory()
	rss0 := processRSS()
	var pn []*peerdNode
	defer func() {
		for _, x := range pn {
			x.n.Close()
		}
	}()
	var boot string
	for i := 0; i < N; i++ {
		ip := fmt.Sprintf("127.1.%d.%d", i/250, 1+i%250)
		key, _, err := crypto.GenerateEd25519Key(rand.Reader)
		if err != nil {
			return err
		}
		reg := prometheus.NewRegistry()
		st := &oneByteStore{keys: map[blob.Key]bool{}}
		cfg := p2p.Config{Key: key, ListenAddr: "/ip4/" + ip + "/tcp/0", PeerAddr: ip + ":0",
			Stores: []p2p.LocalStore{st}, Registerer: reg, Logger: quiet, UserAgent: "peerd-bench"}
		if boot != "" {
			cfg.Bootstrap = []string{boot}
		}
		n, err := p2p.New(ctx, cfg)
		if err != nil {
			return fmt.Errorf("peerd node %d: %w", i, err)
		}
		pn = append(pn, &peerdNode{n: n, reg: reg, store: st})
		if i == 0 {
			boot = fmt.Sprintf("%s/p2p/%s", n.Addrs()[0], n.ID())
		}
	}
	runtime.GC()
	debug.FreeOSMemory()
	perNode := (processRSS() - rss0) / float64(N)

	var kn []*kadNode
	defer func() {
		for _, x := range kn {
			x.d.Close()
			x.h.Close()
		}
	}()
	var kboot peer.AddrInfo
	for i := 0; i < N; i++ {
		ip := fmt.Sprintf("127.2.%d.%d", i/250, 1+i%250)
		h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/"+ip+"/tcp/0"), libp2p.Transport(tcp.NewTCPTransport),
			libp2p.DisableRelay(), libp2p.UserAgent("kad-bench"))
		if err != nil {
			return fmt.Errorf("kad host %d: %w", i, err)
		}
		opts := []dht.Option{dht.Mode(dht.ModeServer), dht.ProtocolPrefix("/peerd-bench-kad"), dht.DisableValues()}
		if i > 0 {
			opts = append(opts, dht.BootstrapPeers(kboot))
		}
		d, err := dht.New(h, opts...)
		if err != nil {
			h.Close()
			return err
		}
		kn = append(kn, &kadNode{h: h, d: d})
		if i == 0 {
			kboot = peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()}
		} else {
			cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
			err := h.Connect(cctx, kboot)
			ccancel()
			if err != nil {
				return fmt.Errorf("kad node %d: connect: %w", i, err)
			}
		}
	}
	for _, k := range kn[1:] {
		k.d.RefreshRoutingTable()
	}

	// Routing tables: both networks must know a good part of themselves.
	want := min(N-1, 10)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		low := 0
		for i := range pn {
			if pn[i].n.RoutingTableSize() < want || kn[i].d.RoutingTable().Size() < want {
				low++
			}
		}
		if low == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.note("row 5: %d of %d node pairs still have fewer than %d routing table entries after 2 min", low, N, want)
			break
		}
		if err := sleep(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}

	// Keys: K with one provider and K with ten, the same holders in both
	// networks; every node also holds a warm-up key.
	K := c.dhtKeys
	type keyCase struct {
		k       blob.Key
		c       cid.Cid
		holders []int
	}
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
	warm := make([]blob.Key, N)
	expected := 0
	provide := func(kc keyCase) error {
		for _, h := range kc.holders {
			pn[h].store.add(kc.k)
			pn[h].n.BlobAdded(kc.k)
			expected++
			pctx, pcancel := context.WithTimeout(ctx, 30*time.Second)
			err := kn[h].d.Provide(pctx, kc.c, true)
			pcancel()
			if err != nil {
				return fmt.Errorf("kad provide: %w", err)
			}
		}
		return nil
	}
	for i := range warm {
		warm[i] = randomKey()
		pn[i].store.add(warm[i])
		pn[i].n.BlobAdded(warm[i])
		expected++
	}
	advStart := time.Now()
	for _, kc := range append(append([]keyCase{}, one...), ten...) {
		if err := provide(kc); err != nil {
			return err
		}
	}
	for {
		var done float64
		for _, x := range pn {
			done += counterSum(x.reg, "peerd_p2p_provides_total", "result", "ok")
		}
		if done >= float64(expected) {
			break
		}
		if time.Since(advStart) > 5*time.Minute {
			return fmt.Errorf("peerd nodes advertised %v of %d keys in 5 min", done, expected)
		}
		if err := sleep(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}

	// A few askers, each with data-plane connections to every node already
	// open, so a timed fetch is lookup + one warm request.
	askers := mrand.Perm(N)[:min(N, 5)]
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
	for _, a := range askers {
		for i, k := range warm {
			if i == a {
				continue
			}
			if _, err := fetch(a, k); err != nil {
				t.note("row 5: warm-up fetch from node %d: %v", i, err)
			}
		}
	}

	type result struct{ peerd, kad, kadGrace []time.Duration }
	measure := func(cases []keyCase) (result, int, error) {
		var r result
		failed := 0
		for i, kc := range cases {
			asker := askers[i%len(askers)]
			for slicesContains(kc.holders, asker) {
				asker = (asker + 1) % N
			}
			kadRun := func() {
				fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
				start := time.Now()
				ch := kn[asker].d.FindProvidersAsync(fctx, kc.c, 1)
				if _, ok := <-ch; ok {
					r.kad = append(r.kad, time.Since(start))
				} else {
					failed++
				}
				fcancel()
				for range ch {
				}
			}
			// kad-dht asked the way peerd's finder asks (up to 16 providers,
			// returning 2 ms after the first): tells the finder's policy
			// apart from the rest of peerd's path.
			kadGraceRun := func() {
				fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
				defer fcancel()
				start := time.Now()
				ch := kn[asker].d.FindProvidersAsync(fctx, kc.c, 16)
				if _, ok := <-ch; !ok {
					return
				}
				grace := time.NewTimer(2 * time.Millisecond)
				defer grace.Stop()
				for open := true; open; {
					select {
					case _, open = <-ch:
					case <-grace.C:
						open = false
					}
				}
				r.kadGrace = append(r.kadGrace, time.Since(start))
				fcancel()
				for range ch {
				}
			}
			peerdRun := func() {
				t1, err := fetch(asker, kc.k)
				if err != nil {
					failed++
					return
				}
				// The same fetch again hits Source's provider cache: what
				// remains is the warm data-plane request.
				t2, err := fetch(asker, kc.k)
				if err != nil {
					failed++
					return
				}
				r.peerd = append(r.peerd, max(0, t1-t2))
			}
			if i%2 == 0 {
				kadRun()
				peerdRun()
				kadGraceRun()
			} else {
				peerdRun()
				kadGraceRun()
				kadRun()
			}
			if ctx.Err() != nil {
				return r, failed, ctx.Err()
			}
		}
		return r, failed, nil
	}
	lookups := func() (found, notFound uint64) {
		for _, a := range askers {
			found += histCount(pn[a].reg, "peerd_p2p_lookup_seconds", "result", "found")
			notFound += histCount(pn[a].reg, "peerd_p2p_lookup_seconds", "result", "not_found")
		}
		return
	}
	addRows := func(label string, r result, failed int) {
		f, nf := lookups()
		t.note("row 5 after %s: the askers' DHT lookups so far: %d found, %d found nobody within --resolve-timeout (%v)", label, f, nf, "20ms default")
		for _, q := range []struct {
			name string
			p    float64
		}{{"p50", .5}, {"p99", .99}} {
			p, k := quantile(r.peerd, q.p), quantile(r.kad, q.p)
			rt := float64(p) / float64(max(k, 1))
			t.add(row{group: "5", what: fmt.Sprintf("discovery, %d nodes: first provider %s, %s (%d keys, %d failed)", N, q.name, label, len(r.kad), failed),
				peerd: ms(p), baseline: ms(k) + " kad-dht", ratio: fmt.Sprintf("%.2f", rt), goal: "≤ 1.2×", verdict: atMost(rt, 1.2)})
		}
		t.add(row{group: "5", what: fmt.Sprintf("(diagnostic) %s: kad-dht asked like peerd's finder (16 wanted, return 2 ms after the first), p50 / p99", label),
			peerd:    ms(quantile(r.peerd, .5)) + " / " + ms(quantile(r.peerd, .99)),
			baseline: ms(quantile(r.kadGrace, .5)) + " / " + ms(quantile(r.kadGrace, .99)) + " kad-dht + grace",
			ratio:    fmt.Sprintf("%.2f", float64(quantile(r.peerd, .5))/float64(max(quantile(r.kadGrace, .5), 1)))})
	}
	r1, f1, err := measure(one)
	if err != nil {
		return err
	}
	addRows("1 provider", r1, f1)
	r10, f10, err := measure(ten)
	if err != nil {
		return err
	}
	addRows("10 providers", r10, f10)

	// A miss: peerd's Source gives up after its lookups (with retries);
	// kad-dht's query ends when it has asked the closest peers.
	var pm, km []time.Duration
	for i := 0; i < min(K, 50); i++ {
		k := randomKey()
		cc, _ := p2p.KeyToCID(k)
		asker := askers[i%len(askers)]
		d, err := fetch(asker, k)
		if err == nil {
			return fmt.Errorf("fetch of a key nobody holds succeeded")
		}
		pm = append(pm, d)
		fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
		start := time.Now()
		for range kn[asker].d.FindProvidersAsync(fctx, cc, 1) {
		}
		km = append(km, time.Since(start))
		fcancel()
	}
	t.add(row{group: "5", what: fmt.Sprintf("discovery, %d nodes: miss (nobody holds the key) p50 / p99", N),
		peerd: ms(quantile(pm, .5)) + " / " + ms(quantile(pm, .99)), baseline: ms(quantile(km, .5)) + " / " + ms(quantile(km, .99)) + " kad-dht",
		ratio: fmt.Sprintf("%.2f", float64(quantile(pm, .5))/float64(max(quantile(km, .5), 1)))})
	t.add(row{group: "5", what: fmt.Sprintf("discovery, %d nodes: memory per in-process p2p node (process RSS growth ÷ nodes)", N),
		peerd: fmt.Sprintf("%.1f MiB", perNode)})

	return peerdAtScale(ctx, c, t, pn)
}

func slicesContains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// peerdAtScale starts a real peerd process, makes every in-process node
// connect to it and reads its RSS with that many peers.
func peerdAtScale(ctx context.Context, c *config, t *table, pn []*peerdNode) error {
	boot := fmt.Sprintf("%s/p2p/%s", pn[0].n.Addrs()[0], pn[0].n.ID())
	o, err := startOrigin(ctx, c, "origin-dht")
	if err != nil {
		return err
	}
	defer o.fs.Stop()
	n, err := startNode(ctx, c, filepath.Join(c.work, "dht-peerd"), nodeOpts{args: []string{"--bootstrap", boot, "--upstream-allow", o.host()}})
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
	t.add(row{group: "5", what: fmt.Sprintf("discovery: RSS of a peerd process connected to %.0f peers (peak %.1f MiB)", peers, hwm),
		peerd: fmt.Sprintf("%.1f MiB", rss), goal: "≤ 64 MiB", verdict: atMost(rss, 64)})
	return missTTFB(ctx, c, t, o, n, fmt.Sprintf("a peerd in the %d-node DHT", len(pn)))
}
