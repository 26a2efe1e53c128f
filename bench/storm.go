package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/k8s"
	"github.com/peerd-project/peerd/p2p"
)

// The start storm (BENCH_ONLY=storm): every node of a network starts within
// a few seconds, as after an upgrade of the DaemonSet, and joins the way the
// daemon does in Kubernetes: k8s.Bootstrapper with the discovery answers a
// Lease or the headless Service would give. Node 0 is the Lease holder and
// lives alone in this process, so this process's CPU is the holder's; the
// others run in child processes like row 5's. Every node's key and address
// follow from its index, so any process can name any node.

// stormPort is every storm node's libp2p port: each node has its own
// loopback IP, as each pod of a DaemonSet has its node's.
const stormPort = 4101

func stormIP(i int) string { return fmt.Sprintf("127.40.%d.%d", i/250, 1+i%250) }

// stormKey is node i's identity, the same in every process.
func stormKey(i int) (crypto.PrivKey, error) {
	var seed [32]byte
	binary.BigEndian.PutUint64(seed[:], uint64(i)+1)
	k, _, err := crypto.GenerateEd25519Key(rand.NewChaCha8(seed))
	return k, err
}

// stormBook names every node of a storm network by index and ID.
type stormBook struct {
	infos []peer.AddrInfo
	index map[peer.ID]int
}

func newStormBook(n int) (*stormBook, error) {
	b := &stormBook{index: make(map[peer.ID]int, n)}
	for i := range n {
		k, err := stormKey(i)
		if err != nil {
			return nil, err
		}
		id, err := peer.IDFromPrivateKey(k)
		if err != nil {
			return nil, err
		}
		a, err := ma.NewMultiaddr(fmt.Sprintf("/ip4/%s/tcp/%d", stormIP(i), stormPort))
		if err != nil {
			return nil, err
		}
		b.infos = append(b.infos, peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{a}})
		b.index[id] = i
	}
	return b, nil
}

// stormDiscoverer answers what the daemon's discovery would. lease: the
// holder (node 0), nobody for the holder itself. dns: every node of the
// network (the chart's headless Service publishes pods before they are
// ready), of which the bootstrapper dials 3 at random; the daemon's DNS
// mode also probes each address once to learn its peer ID, which this
// stand-in skips.
type stormDiscoverer struct {
	mode string
	self int
	book *stormBook
}

var _ k8s.Discoverer = (*stormDiscoverer)(nil)

func (d *stormDiscoverer) Name() string { return d.mode }

func (d *stormDiscoverer) Changed() <-chan struct{} { return nil }

func (d *stormDiscoverer) Discover(context.Context) ([]peer.AddrInfo, error) {
	if d.mode == "k8s-lease" {
		if d.self == 0 {
			return nil, nil
		}
		return d.book.infos[:1], nil
	}
	out := make([]peer.AddrInfo, 0, len(d.book.infos)-1)
	for i, ai := range d.book.infos {
		if i != d.self {
			out = append(out, ai)
		}
	}
	return out, nil
}

// stormHost adapts a node to k8s.Host as the daemon does (live peers: the
// smaller of routing table and connected peers).
type stormHost struct{ *p2p.Node }

var _ k8s.Host = stormHost{}

func (h stormHost) LivePeers() int { return min(h.RoutingTableSize(), h.ConnectedPeers()) }

type stormNode struct {
	idx    int
	n      *p2p.Node
	reg    *prometheus.Registry
	store  *oneByteStore
	boot   *k8s.Bootstrapper
	cancel context.CancelFunc
	done   chan struct{}
}

// stormStat is one node's state at a sample.
type stormStat struct {
	Ready   bool
	Table   int
	Inbound int
}

// stormStart creates nodes [lo, hi) of a network of total nodes, each
// joining through mode's discovery in the background.
func (s *nodeSet) stormStart(ctx context.Context, mode string, lo, hi, total int) error {
	if s.book == nil || len(s.book.infos) != total {
		b, err := newStormBook(total)
		if err != nil {
			return err
		}
		s.book = b
	}
	for i := lo; i < hi; i++ {
		key, err := stormKey(i)
		if err != nil {
			return err
		}
		reg := prometheus.NewRegistry()
		st := &oneByteStore{keys: map[blob.Key]bool{}}
		cfg := p2p.Config{Key: key, ListenAddr: fmt.Sprintf("/ip4/%s/tcp/%d", stormIP(i), stormPort), PeerAddr: stormIP(i) + ":0",
			ResolveTimeout: 20 * time.Millisecond, ResolveRetries: 1,
			Stores: []p2p.LocalStore{st}, Registerer: reg, Logger: s.quiet, UserAgent: "peerd-bench"}
		n, err := p2p.New(ctx, cfg)
		if err != nil {
			return fmt.Errorf("storm node %d: %w", i, err)
		}
		bctx, cancel := context.WithCancel(context.Background())
		boot := k8s.NewBootstrapper(stormHost{n}, &stormDiscoverer{mode: mode, self: i, book: s.book}, k8s.BootstrapOptions{Logger: s.quiet})
		sn := &stormNode{idx: i, n: n, reg: reg, store: st, boot: boot, cancel: cancel, done: make(chan struct{})}
		go func() {
			defer close(sn.done)
			boot.Run(bctx)
		}()
		s.storm = append(s.storm, sn)
	}
	return nil
}

func (s *nodeSet) stormStats() []stormStat {
	out := make([]stormStat, len(s.storm))
	for i, x := range s.storm {
		in := 0
		for _, c := range x.n.Host().Network().Conns() {
			if c.Stat().Direction == network.DirInbound {
				in++
			}
		}
		out[i] = stormStat{Ready: x.boot.Ready() == nil, Table: x.n.RoutingTableSize(), Inbound: in}
	}
	return out
}

// stormPeers lists, for each node of the part, the indexes of the nodes it
// is connected to.
func (s *nodeSet) stormPeers() [][]int {
	out := make([][]int, len(s.storm))
	for i, x := range s.storm {
		for _, p := range x.n.Host().Network().Peers() {
			if j, ok := s.book.index[p]; ok {
				out[i] = append(out[i], j)
			}
		}
	}
	return out
}

func (s *nodeSet) stormClose() {
	var wg sync.WaitGroup
	for _, x := range s.storm {
		wg.Go(func() {
			x.cancel()
			<-x.done
			x.n.Close()
		})
	}
	wg.Wait()
	s.storm = nil
}

func (p *remotePart) stormStart(mode string, lo, hi, total int) error {
	_, err := p.call(hostReq{Op: "storm-start", Kind: mode, Lo: lo, Hi: hi, Total: total})
	return err
}

func (p *remotePart) stormStats() ([]stormStat, error) {
	r, err := p.call(hostReq{Op: "storm-stats"})
	return r.Storm, err
}

func (p *remotePart) stormPeers() ([][]int, error) {
	r, err := p.call(hostReq{Op: "storm-peers"})
	return r.Peers, err
}

// benchStorm starts BENCH_STORM_NODES nodes at once in each bootstrap mode
// and reports how long the network takes to form.
func benchStorm(ctx context.Context, c *config, t *table) error {
	n := envInt("BENCH_STORM_NODES", 300)
	if n < 2 {
		return errors.New("BENCH_STORM_NODES must be at least 2")
	}
	modes := strings.Fields(strings.ReplaceAll(os.Getenv("BENCH_STORM_MODES"), ",", " "))
	if len(modes) == 0 {
		modes = []string{"k8s-lease", "dns"}
	}
	for _, mode := range modes {
		if mode != "k8s-lease" && mode != "dns" {
			return fmt.Errorf("BENCH_STORM_MODES: unknown mode %q (k8s-lease, dns)", mode)
		}
		if err := stormOnce(ctx, c, t, mode, n); err != nil {
			return fmt.Errorf("%s: %w", mode, err)
		}
	}
	return nil
}

func stormOnce(ctx context.Context, c *config, t *table, mode string, n int) error {
	per := envInt("BENCH_STORM_PER_PROCESS", 25)
	per = max(per, 1)
	local := newNodeSet()
	defer local.stormClose()
	var parts []*remotePart
	var los []int
	defer func() {
		for _, p := range parts {
			p.close()
		}
	}()
	// Child processes first, idle: the storm is the nodes, not the
	// processes starting.
	for lo := 1; lo < n; lo += per {
		p, err := startRemotePart(ctx, c, fmt.Sprintf("storm-%s-%d", mode, lo))
		if err != nil {
			return err
		}
		parts, los = append(parts, p), append(los, lo)
	}
	// The holder (node 0) runs before the others start, as a Lease holder
	// does: it leads alone.
	if err := local.stormStart(ctx, mode, 0, 1, n); err != nil {
		return err
	}
	cpu0 := selfCPU()
	start := time.Now()
	errs := make([]error, len(parts))
	var wg sync.WaitGroup
	for i, p := range parts {
		wg.Go(func() { errs[i] = p.stormStart(mode, los[i], min(n, los[i]+per), n) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	started := time.Since(start)

	// Sample every node twice a second until every node is ready and the
	// mean routing table has not grown by 1% in 10 s (or 5 minutes pass).
	type sample struct {
		at    time.Duration
		stats []stormStat
		cpu   float64
	}
	var samples []sample
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	deadline := start.Add(5 * time.Minute)
	var stableSince time.Duration
	var lastMean float64
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		all := local.stormStats()
		got := make([][]stormStat, len(parts))
		for i, p := range parts {
			wg.Go(func() { got[i], errs[i] = p.stormStats() })
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return err
		}
		for _, g := range got {
			all = append(all, g...)
		}
		at := time.Since(start)
		samples = append(samples, sample{at: at, stats: all, cpu: selfCPU() - cpu0})
		ready, sum := 0, 0
		for _, s := range all {
			if s.Ready {
				ready++
			}
			sum += s.Table
		}
		mean := float64(sum) / float64(len(all))
		if ready < len(all) || mean > lastMean*1.01 {
			stableSince, lastMean = at, mean
		}
		if ready == len(all) && at-stableSince >= 10*time.Second || time.Now().After(deadline) {
			break
		}
	}
	last := samples[len(samples)-1]

	// Per node: when it was first ready, and when its routing table first
	// reached 90% of its size at the end.
	readyAt := make([]time.Duration, n)
	tableAt := make([]time.Duration, n)
	for i := range n {
		readyAt[i], tableAt[i] = -1, -1
		for _, s := range samples {
			if readyAt[i] < 0 && s.stats[i].Ready {
				readyAt[i] = s.at
			}
			if tableAt[i] < 0 && float64(s.stats[i].Table) >= 0.9*float64(last.stats[i].Table) {
				tableAt[i] = s.at
			}
		}
	}
	notReady := 0
	for _, d := range readyAt {
		if d < 0 {
			notReady++
		}
	}
	peakIn, peakNode := 0, 0
	for _, s := range samples {
		for i, st := range s.stats {
			if st.Inbound > peakIn {
				peakIn, peakNode = st.Inbound, i
			}
		}
	}
	// The holder's CPU: the most cores it used over any 2-second window.
	peakCores := 0.0
	for i := range samples {
		for j := i + 1; j < len(samples); j++ {
			if d := samples[j].at - samples[i].at; d >= 2*time.Second {
				peakCores = max(peakCores, (samples[j].cpu-samples[i].cpu)/d.Seconds())
				break
			}
		}
	}
	// Islands: connected components of the "is connected to" graph.
	adj := make([][]int, n)
	adj[0] = local.stormPeers()[0]
	for i, p := range parts {
		pp, err := p.stormPeers()
		if err != nil {
			return err
		}
		for j, l := range pp {
			adj[los[i]+j] = l
		}
	}
	comps := components(adj)
	tables := make([]int, n)
	for i, s := range last.stats {
		tables[i] = s.Table
	}
	sort.Ints(tables)
	q := func(d []time.Duration, p float64) string {
		d = slices.DeleteFunc(slices.Clone(d), func(x time.Duration) bool { return x < 0 })
		if len(d) == 0 {
			return "never"
		}
		slices.Sort(d)
		return d[min(len(d)-1, int(p*float64(len(d))))].Round(100 * time.Millisecond).String()
	}
	what := fmt.Sprintf("start storm, %d nodes (%s), all started within %v", n, mode, started.Round(100*time.Millisecond))
	t.add(row{group: "9", what: what + ": every node ready (p50 / max)", peerd: fmt.Sprintf("%s / %s", q(readyAt, 0.5), q(readyAt, 1)),
		verdict: stormVerdict(notReady == 0 && len(comps) == 1)})
	t.add(row{group: "9", what: what + ": routing table within 10% of its size at the end (p50 / max)", peerd: fmt.Sprintf("%s / %s", q(tableAt, 0.5), q(tableAt, 1))})
	t.add(row{group: "9", what: what + ": routing table size at the end (min / p50 / max)", peerd: fmt.Sprintf("%d / %d / %d", tables[0], tables[len(tables)/2], tables[len(tables)-1])})
	t.add(row{group: "9", what: what + ": peak inbound connections at one node", peerd: fmt.Sprintf("%d (node %d)", peakIn, peakNode)})
	t.add(row{group: "9", what: what + ": the Lease holder's CPU (node 0), total / busiest 2 s", peerd: fmt.Sprintf("%.1f s / %.2f cores", last.cpu, peakCores)})
	t.add(row{group: "9", what: what + ": groups of connected nodes at the end (1: no island)", peerd: fmt.Sprintf("%d", len(comps)), verdict: stormVerdict(len(comps) == 1)})
	if notReady > 0 {
		t.note("storm (%s): %d of %d nodes never became ready within %v", mode, notReady, n, last.at.Round(time.Second))
	}
	if len(comps) > 1 {
		sizes := make([]string, 0, len(comps))
		for _, c := range comps {
			sizes = append(sizes, fmt.Sprint(len(c)))
		}
		t.note("storm (%s): group sizes %s", mode, strings.Join(sizes, ", "))
	}
	t.note("storm (%s): sampled for %v; the samples: %d", mode, last.at.Round(time.Second), len(samples))
	cost, took, err := provideCost(ctx, local.storm[0], 200)
	if err != nil {
		return err
	}
	t.add(row{group: "9", what: fmt.Sprintf("%s: one advertisement (a provide: a walk to the 20 closest nodes, then the record to each), bytes on the wire, all nodes together (200 keys from node 0, loopback counters less the idle rate)", what),
		peerd: fmt.Sprintf("%.1f KiB", cost/1024)})
	t.note("storm (%s): node 0 advertised 200 keys in %v", mode, took.Round(100*time.Millisecond))
	return nil
}

// provideCost has x advertise keys new keys and returns the loopback bytes
// one advertisement cost (the traffic of an idle period as long subtracted)
// and the time they took.
func provideCost(ctx context.Context, x *stormNode, keys int) (float64, time.Duration, error) {
	idle := 10 * time.Second
	b0, err := loopbackBytes()
	if err != nil {
		return 0, 0, err
	}
	if err := sleep(ctx, idle); err != nil {
		return 0, 0, err
	}
	b1, err := loopbackBytes()
	if err != nil {
		return 0, 0, err
	}
	rate := float64(b1-b0) / idle.Seconds()
	ok0 := counterSum(x.reg, "peerd_p2p_provides_total", "result", "ok")
	start := time.Now()
	for range keys {
		k := randomKey()
		x.store.add(k)
		x.n.Announcer("bench").Holding(k)
	}
	for counterSum(x.reg, "peerd_p2p_provides_total", "result", "ok")-ok0 < float64(keys) {
		if time.Since(start) > 5*time.Minute {
			return 0, 0, fmt.Errorf("node 0 advertised %.0f of %d keys in 5 minutes", counterSum(x.reg, "peerd_p2p_provides_total", "result", "ok")-ok0, keys)
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return 0, 0, err
		}
	}
	took := time.Since(start)
	b2, err := loopbackBytes()
	if err != nil {
		return 0, 0, err
	}
	return (float64(b2-b1) - rate*took.Seconds()) / float64(keys), took, nil
}

// loopbackBytes is the bytes the loopback interface has carried (each
// packet once).
func loopbackBytes() (uint64, error) {
	raw, err := os.ReadFile("/proc/net/dev")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(raw), "\n") {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok || name != "lo" {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 1 {
			break
		}
		var v uint64
		_, err := fmt.Sscan(f[0], &v)
		return v, err
	}
	return 0, errors.New("no loopback interface in /proc/net/dev")
}

func stormVerdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

// components returns the connected components of an undirected graph given
// as adjacency lists (an edge in either list joins the two nodes).
func components(adj [][]int) [][]int {
	parent := make([]int, len(adj))
	for i := range parent {
		parent[i] = i
	}
	var find func(int) int
	find = func(x int) int {
		for parent[x] != x {
			parent[x] = parent[parent[x]]
			x = parent[x]
		}
		return x
	}
	for i, l := range adj {
		for _, j := range l {
			if j >= 0 && j < len(adj) {
				parent[find(i)] = find(j)
			}
		}
	}
	groups := map[int][]int{}
	for i := range adj {
		r := find(i)
		groups[r] = append(groups[r], i)
	}
	out := make([][]int, 0, len(groups))
	for _, g := range groups {
		out = append(out, g)
	}
	sort.Slice(out, func(a, b int) bool { return len(out[a]) > len(out[b]) })
	return out
}
