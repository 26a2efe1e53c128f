package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/p2p"
)

// A row-5 network is split into parts of at most c.dhtPerProcess nodes: the
// first part, which holds the bootstrap node and every asker, lives in this
// process; the others each live in a child process ("peerd-bench
// dht-host") driven over its stdin and stdout. With both ends of a
// connection inside one process every connection costs two descriptors,
// and this VM caps a process at 20,000: 100 nodes fit in one process, 500
// do not.

// dhtPart is one process's share of a network's nodes.
type dhtPart interface {
	// start creates one node per address (ips) of the given kind ("peerd"
	// or "kad"): the first joins through boot (with boot empty it is the
	// network's bootstrap node), the others through the first. It returns
	// the nodes' p2p addresses.
	// resolve is a peerd node's --resolve-timeout.
	start(ctx context.Context, kind string, ips []string, boot string, resolve time.Duration) ([]string, error)
	// refresh refreshes every node's routing table.
	refresh(ctx context.Context) error
	// sizes are the nodes' routing table sizes.
	sizes(ctx context.Context) ([]int, error)
	// provide makes node items[i].Node (an index into this part) hold and
	// advertise items[i].Key; kad-dht nodes advertise with at most
	// workers provides at a time.
	provide(ctx context.Context, items []provideItem, workers int) error
	// provided is how many of the advertisements asked so far completed.
	provided(ctx context.Context) (int, error)
	// memory is the growth of the hosting process's RSS since the part
	// was created, in MiB, after a GC, and the descriptors it holds.
	memory(ctx context.Context) (float64, int, error)
	close()
}

type provideItem struct {
	Node int
	Key  blob.Key
}

// nodeSet is a part whose nodes live in this process.
type nodeSet struct {
	kind  string
	quiet *slog.Logger
	rss0  float64
	pn    []*peerdNode
	kn    []*kadNode

	// kad-dht provides run on a pool of workers, as peerd's advertiser
	// runs its own.
	once     sync.Once
	work     chan provideItem
	wg       sync.WaitGroup
	done     atomic.Int64
	errMu    sync.Mutex
	firstErr error
	stop     context.CancelFunc

	// The start storm's nodes (storm.go).
	book  *stormBook
	storm []*stormNode
}

func newNodeSet() *nodeSet {
	runtime.GC()
	debug.FreeOSMemory()
	return &nodeSet{quiet: nodeLogger(), rss0: processRSS()}
}

// nodeLogger is what row-5 nodes log to: nothing, or with BENCH_DHT_LOG
// set (debug, info, warn, error) that level and above on stderr (a child
// process's stderr is its log file in the work folder). Children inherit
// the environment, so one knob covers every process.
func nodeLogger() *slog.Logger {
	var lvl slog.Level
	v := os.Getenv("BENCH_DHT_LOG")
	if v == "" || lvl.UnmarshalText([]byte(v)) != nil {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

// waitJoined waits until n is connected to the peer at addr (5 min at most).
func waitJoined(ctx context.Context, n *p2p.Node, addr string) error {
	bi, err := peer.AddrInfoFromString(addr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	for n.Host().Network().Connectedness(bi.ID) != network.Connected {
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("not connected to %s: %w", bi.ID, err)
		}
	}
	return nil
}

func (s *nodeSet) start(ctx context.Context, kind string, ips []string, boot string, resolve time.Duration) ([]string, error) {
	s.kind = kind
	var addrs []string
	for i, ip := range ips {
		var addr string
		switch kind {
		case "peerd":
			key, _, err := crypto.GenerateEd25519Key(rand.Reader)
			if err != nil {
				return nil, err
			}
			reg := prometheus.NewRegistry()
			st := &oneByteStore{keys: map[blob.Key]bool{}}
			// The daemon's defaults (--resolve-timeout 20ms unless
			// BENCH_DHT_RESOLVE_TIMEOUT, --resolve-retries 1).
			cfg := p2p.Config{Key: key, ListenAddr: "/ip4/" + ip + "/tcp/0", PeerAddr: ip + ":0",
				ResolveTimeout: resolve, ResolveRetries: 1,
				Stores: []p2p.LocalStore{st}, Registerer: reg, Logger: s.quiet, UserAgent: "peerd-bench"}
			if boot != "" {
				cfg.Bootstrap = []string{boot}
			}
			n, err := p2p.New(ctx, cfg)
			if err != nil {
				return nil, fmt.Errorf("peerd node %s: %w", ip, err)
			}
			s.pn = append(s.pn, &peerdNode{n: n, reg: reg, store: st})
			addr = fmt.Sprintf("%s/p2p/%s", n.Addrs()[0], n.ID())
			if i == 0 && boot != "" {
				// As for kad-dht below: the part's first node has joined
				// before the others join through it. The daemon dials on
				// its own, with backoff; the network's bootstrap node
				// refuses handshakes while at its inbound limit.
				if err := waitJoined(ctx, n, boot); err != nil {
					return nil, fmt.Errorf("peerd node %s: %w", ip, err)
				}
			}
		case "kad":
			h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/"+ip+"/tcp/0"), libp2p.Transport(tcp.NewTCPTransport),
				libp2p.DisableRelay(), libp2p.UserAgent("kad-bench"))
			if err != nil {
				return nil, fmt.Errorf("kad host %s: %w", ip, err)
			}
			opts := []dht.Option{dht.Mode(dht.ModeServer), dht.ProtocolPrefix("/peerd-bench-kad"), dht.DisableValues()}
			var bi *peer.AddrInfo
			if boot != "" {
				if bi, err = peer.AddrInfoFromString(boot); err != nil {
					h.Close()
					return nil, err
				}
				opts = append(opts, dht.BootstrapPeers(*bi))
			}
			d, err := dht.New(h, opts...)
			if err != nil {
				h.Close()
				return nil, err
			}
			s.kn = append(s.kn, &kadNode{h: h, d: d})
			addr = fmt.Sprintf("%s/p2p/%s", h.Addrs()[0], h.ID())
			// Tries for up to 5 minutes: the network's bootstrap node,
			// known to every node, refuses handshakes while it sits at its
			// resource manager's inbound limit with connections too young
			// to trim (ten tries a second apart once ran out at 500 nodes).
			for deadline := time.Now().Add(5 * time.Minute); bi != nil; {
				cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
				err = h.Connect(cctx, *bi)
				ccancel()
				if err == nil {
					break
				}
				if time.Now().After(deadline) {
					return nil, fmt.Errorf("kad node %s: connect: %w", ip, err)
				}
				if err := sleep(ctx, time.Second); err != nil {
					return nil, err
				}
				// libp2p holds a failed peer back for 5 s and more.
				if sw, ok := h.Network().(*swarm.Swarm); ok {
					sw.Backoff().Clear(bi.ID)
				}
			}
		default:
			return nil, fmt.Errorf("unknown node kind %q", kind)
		}
		addrs = append(addrs, addr)
		// The part's later nodes join through its first, once it has
		// joined: hundreds of nodes dialling one bootstrap node at once
		// are refused by its resource manager.
		if i == 0 {
			boot = addr
		}
	}
	return addrs, nil
}

func (s *nodeSet) refresh(ctx context.Context) error {
	var wg sync.WaitGroup
	for _, x := range s.pn {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rctx, rcancel := context.WithTimeout(ctx, time.Minute)
			defer rcancel()
			x.n.RefreshRoutingTable(rctx)
		}()
	}
	for _, x := range s.kn {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case <-x.d.RefreshRoutingTable():
			case <-ctx.Done():
			case <-time.After(time.Minute):
			}
		}()
	}
	wg.Wait()
	return ctx.Err()
}

func (s *nodeSet) sizes(context.Context) ([]int, error) {
	var out []int
	for _, x := range s.pn {
		out = append(out, x.n.RoutingTableSize())
	}
	for _, x := range s.kn {
		out = append(out, x.d.RoutingTable().Size())
	}
	return out, nil
}

func (s *nodeSet) provide(ctx context.Context, items []provideItem, workers int) error {
	for _, it := range items {
		if it.Node < 0 || it.Node >= len(s.pn)+len(s.kn) {
			return fmt.Errorf("provide: no node %d here", it.Node)
		}
	}
	if s.kind == "peerd" {
		for _, it := range items {
			s.pn[it.Node].store.add(it.Key)
			s.pn[it.Node].n.Announcer("bench").Holding(it.Key)
		}
		return nil
	}
	s.once.Do(func() {
		wctx, cancel := context.WithCancel(context.Background())
		s.stop = cancel
		s.work = make(chan provideItem, 1024)
		for range max(1, workers) {
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				for j := range s.work {
					cc, err := p2p.KeyToCID(j.Key)
					if err == nil {
						pctx, pcancel := context.WithTimeout(wctx, time.Minute)
						err = s.kn[j.Node].d.Provide(pctx, cc, true)
						pcancel()
					}
					if err != nil {
						s.errMu.Lock()
						if s.firstErr == nil {
							s.firstErr = err
						}
						s.errMu.Unlock()
						continue
					}
					s.done.Add(1)
				}
			}()
		}
	})
	for _, it := range items {
		select {
		case s.work <- it:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func (s *nodeSet) provided(context.Context) (int, error) {
	if s.kind == "peerd" {
		var done float64
		for _, x := range s.pn {
			done += counterSum(x.reg, "peerd_p2p_provides_total", "result", "ok")
		}
		return int(done), nil
	}
	s.errMu.Lock()
	defer s.errMu.Unlock()
	if s.firstErr != nil {
		return 0, fmt.Errorf("kad provide: %w", s.firstErr)
	}
	return int(s.done.Load()), nil
}

func (s *nodeSet) memory(context.Context) (float64, int, error) {
	runtime.GC()
	debug.FreeOSMemory()
	fds, err := os.ReadDir("/proc/self/fd")
	return processRSS() - s.rss0, len(fds), err
}

func (s *nodeSet) close() {
	if s.work != nil {
		close(s.work)
		s.stop()
		s.wg.Wait()
	}
	for _, x := range s.pn {
		x.n.Close()
	}
	for _, x := range s.kn {
		x.d.Close()
		x.h.Close()
	}
	s.stormClose()
}

// hostReq and hostResp are the child protocol: one JSON request per line
// on the child's stdin, one JSON answer per line on its stdout.
type hostReq struct {
	Op      string // start, refresh, sizes, provide, provided, memory, storm-start, storm-stats, storm-peers
	Kind    string
	IPs     []string
	Boot    string
	Resolve time.Duration
	Items   []provideItem
	Workers int
	// storm-start: nodes [Lo, Hi) of Total, Kind the bootstrap mode.
	Lo, Hi, Total int
}

type hostResp struct {
	Err    string
	Addrs  []string
	Sizes  []int
	Count  int
	Memory float64
	Fds    int
	Storm  []stormStat
	Peers  [][]int
}

// serve answers one request on s.
func (s *nodeSet) serve(ctx context.Context, r hostReq) hostResp {
	var out hostResp
	var err error
	switch r.Op {
	case "start":
		out.Addrs, err = s.start(ctx, r.Kind, r.IPs, r.Boot, r.Resolve)
	case "refresh":
		err = s.refresh(ctx)
	case "sizes":
		out.Sizes, err = s.sizes(ctx)
	case "provide":
		err = s.provide(ctx, r.Items, r.Workers)
	case "provided":
		out.Count, err = s.provided(ctx)
	case "memory":
		out.Memory, out.Fds, err = s.memory(ctx)
	case "storm-start":
		err = s.stormStart(ctx, r.Kind, r.Lo, r.Hi, r.Total)
	case "storm-stats":
		out.Storm = s.stormStats()
	case "storm-peers":
		out.Peers = s.stormPeers()
	default:
		err = fmt.Errorf("unknown op %q", r.Op)
	}
	if err != nil {
		out.Err = err.Error()
	}
	return out
}

// runDHTHost is the child process: it hosts one part of a row-5 network
// until its stdin closes (the driver is done or gone).
func runDHTHost() int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	s := newNodeSet()
	defer s.close()
	in := json.NewDecoder(bufio.NewReader(os.Stdin))
	out := json.NewEncoder(os.Stdout)
	for {
		var r hostReq
		if err := in.Decode(&r); err != nil {
			if errors.Is(err, io.EOF) {
				return 0
			}
			fmt.Fprintln(os.Stderr, "dht-host:", err)
			return 1
		}
		if err := out.Encode(s.serve(ctx, r)); err != nil {
			fmt.Fprintln(os.Stderr, "dht-host:", err)
			return 1
		}
	}
}

// remotePart is a part hosted by a child process.
type remotePart struct {
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *json.Decoder
	mu   sync.Mutex
	logf *os.File
}

func startRemotePart(ctx context.Context, c *config, name string) (*remotePart, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(c.work, name+".log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, self, "dht-host")
	cmd.Stderr = logf
	in, err := cmd.StdinPipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	return &remotePart{cmd: cmd, in: in, out: json.NewDecoder(bufio.NewReader(out)), logf: logf}, nil
}

// call sends one request and waits for its answer; the child answers in
// order, one at a time. Killing the child (ctx) ends a call that hangs.
func (p *remotePart) call(r hostReq) (hostResp, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var resp hostResp
	if err := json.NewEncoder(p.in).Encode(r); err != nil {
		return resp, fmt.Errorf("dht-host %s: %w (see %s)", r.Op, err, p.logf.Name())
	}
	if err := p.out.Decode(&resp); err != nil {
		return resp, fmt.Errorf("dht-host %s: %w (see %s)", r.Op, err, p.logf.Name())
	}
	if resp.Err != "" {
		return resp, fmt.Errorf("dht-host %s: %s", r.Op, resp.Err)
	}
	return resp, nil
}

func (p *remotePart) start(_ context.Context, kind string, ips []string, boot string, resolve time.Duration) ([]string, error) {
	r, err := p.call(hostReq{Op: "start", Kind: kind, IPs: ips, Boot: boot, Resolve: resolve})
	return r.Addrs, err
}

func (p *remotePart) refresh(context.Context) error {
	_, err := p.call(hostReq{Op: "refresh"})
	return err
}

func (p *remotePart) sizes(context.Context) ([]int, error) {
	r, err := p.call(hostReq{Op: "sizes"})
	return r.Sizes, err
}

func (p *remotePart) provide(_ context.Context, items []provideItem, workers int) error {
	_, err := p.call(hostReq{Op: "provide", Items: items, Workers: workers})
	return err
}

func (p *remotePart) provided(context.Context) (int, error) {
	r, err := p.call(hostReq{Op: "provided"})
	return r.Count, err
}

func (p *remotePart) memory(context.Context) (float64, int, error) {
	r, err := p.call(hostReq{Op: "memory"})
	return r.Memory, r.Fds, err
}

// close ends the child by closing its stdin and waits for it to close its
// nodes; a child that does not is killed.
func (p *remotePart) close() {
	p.in.Close()
	done := make(chan struct{})
	go func() {
		p.cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
	p.logf.Close()
}

// dhtNet is one network of row 5: its parts and which global node indexes
// each holds (part i holds [lo[i], lo[i+1])).
type dhtNet struct {
	kind  string
	local *nodeSet
	parts []dhtPart
	lo    []int
	addrs []string // every node's p2p address, by index
}

// startNet builds a network of n nodes of the given kind, addresses
// 127.<ipNet>.x.y; node 0 (in this process) is the bootstrap node.
func startNet(ctx context.Context, c *config, kind string, ipNet, n int) (*dhtNet, error) {
	per := max(c.dhtPerProcess, 12)
	net := &dhtNet{kind: kind, local: newNodeSet()}
	ip := func(i int) string { return fmt.Sprintf("127.%d.%d.%d", ipNet, i/250, 1+i%250) }
	ips := func(lo, hi int) []string {
		var out []string
		for i := lo; i < hi; i++ {
			out = append(out, ip(i))
		}
		return out
	}
	first := min(n, per)
	var err error
	net.parts, net.lo = []dhtPart{net.local}, []int{0}
	net.addrs, err = net.local.start(ctx, kind, ips(0, first), "", c.dhtResolve)
	if err != nil {
		net.close()
		return nil, err
	}
	boot := net.addrs[0]
	// One part after the other: on two cores, hundreds of nodes joining
	// at once time out their own handshakes.
	for lo := first; lo < n; lo += per {
		var p *remotePart
		if p, err = startRemotePart(ctx, c, fmt.Sprintf("dht-%s-%d", kind, lo)); err != nil {
			break
		}
		net.parts, net.lo = append(net.parts, p), append(net.lo, lo)
		var addrs []string
		if addrs, err = p.start(ctx, kind, ips(lo, min(n, lo+per)), boot, c.dhtResolve); err != nil {
			break
		}
		net.addrs = append(net.addrs, addrs...)
	}
	net.lo = append(net.lo, n)
	if err != nil {
		net.close()
		return nil, err
	}
	return net, nil
}

// each runs f on every part at once and joins their errors.
func (net *dhtNet) each(f func(i int, p dhtPart) error) error {
	var wg sync.WaitGroup
	errs := make([]error, len(net.parts))
	for i, p := range net.parts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(i, p)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (net *dhtNet) refresh(ctx context.Context) error {
	return net.each(func(_ int, p dhtPart) error { return p.refresh(ctx) })
}

func (net *dhtNet) sizes(ctx context.Context) ([]int, error) {
	all := make([][]int, len(net.parts))
	err := net.each(func(i int, p dhtPart) (err error) {
		all[i], err = p.sizes(ctx)
		return
	})
	var out []int
	for _, s := range all {
		out = append(out, s...)
	}
	return out, err
}

// waitTables waits (2 min at most) until every node's routing table has
// want entries and notes the mean size.
func (net *dhtNet) waitTables(ctx context.Context, t *table, name string, want int) error {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		sz, err := net.sizes(ctx)
		if err != nil {
			return err
		}
		low, sum := 0, 0
		for _, v := range sz {
			sum += v
			if v < want {
				low++
			}
		}
		done := low == 0 || time.Now().After(deadline)
		if low > 0 && done {
			t.note("row 5: %d of %d %s nodes still have fewer than %d routing table entries after 2 min", low, len(sz), name, want)
		}
		if done {
			t.note("row 5: mean routing table size, %s nodes: %.1f", name, float64(sum)/float64(max(len(sz), 1)))
			if len(net.parts) > 1 {
				var by []string
				for i := range net.parts {
					part := sz[net.lo[i]:min(net.lo[i+1], len(sz))]
					ps := 0
					for _, v := range part {
						ps += v
					}
					by = append(by, fmt.Sprintf("%d:%.0f", i, float64(ps)/float64(max(len(part), 1))))
				}
				t.note("row 5: mean routing table size of the %s nodes by process: %s", name, strings.Join(by, " "))
			}
			return nil
		}
		if err := sleep(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}
}

// provide makes every key's holders hold and advertise it and waits until
// every advertisement completed (5 min at most; 1 min per 50 nodes above 250).
func (net *dhtNet) provide(ctx context.Context, cases []keyCase) (int, error) {
	items := make([][]provideItem, len(net.parts))
	expected := 0
	for _, kc := range cases {
		for _, h := range kc.holders {
			i := net.partOf(h)
			items[i] = append(items[i], provideItem{Node: h - net.lo[i], Key: kc.k})
			expected++
		}
	}
	// Sixteen kad-dht provides at a time in the whole network, as in one
	// process: each is a lookup, and hundreds at once on two cores time
	// out.
	workers := max(1, 16/len(net.parts))
	if err := net.each(func(i int, p dhtPart) error { return p.provide(ctx, items[i], workers) }); err != nil {
		return expected, err
	}
	start := time.Now()
	for {
		counts := make([]int, len(net.parts))
		if err := net.each(func(i int, p dhtPart) (err error) {
			counts[i], err = p.provided(ctx)
			return
		}); err != nil {
			return expected, err
		}
		done := 0
		for _, v := range counts {
			done += v
		}
		if done >= expected {
			return expected, nil
		}
		// Every peerd node advertises its keys itself, all at once, as in
		// a cluster; on two cores 500 nodes' provide lookups take minutes.
		if limit := max(5*time.Minute, time.Duration(net.size()/50)*time.Minute); time.Since(start) > limit {
			return expected, fmt.Errorf("%s nodes advertised %d of %d keys in %v", net.kind, done, expected, limit)
		}
		if err := sleep(ctx, 200*time.Millisecond); err != nil {
			return expected, err
		}
	}
}

func (net *dhtNet) partOf(node int) int {
	for i := len(net.lo) - 2; i > 0; i-- {
		if node >= net.lo[i] {
			return i
		}
	}
	return 0
}

// usage is the RSS growth of every process hosting the network divided by
// its nodes, and the most descriptors one process holds: a process near
// its limit fails dials and accepts, which would show as failed lookups.
func (net *dhtNet) usage(ctx context.Context) (perNode float64, maxFds int, err error) {
	growth := make([]float64, len(net.parts))
	fds := make([]int, len(net.parts))
	err = net.each(func(i int, p dhtPart) (err error) {
		growth[i], fds[i], err = p.memory(ctx)
		return
	})
	var sum float64
	for _, g := range growth {
		sum += g
	}
	return sum / float64(max(net.size(), 1)), slices.Max(fds), err
}

// noteFds notes usage's descriptor count next to the process limit.
func (net *dhtNet) noteFds(ctx context.Context, t *table, when string) {
	_, fds, err := net.usage(ctx)
	if err != nil {
		return
	}
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	t.note("row 5: %s network of %d nodes in %d processes, %s: most descriptors in one process %d (limit %d)",
		net.kind, net.size(), len(net.parts), when, fds, lim.Cur)
}

// size is the number of nodes; localSize those in this process.
func (net *dhtNet) size() int      { return net.lo[len(net.lo)-1] }
func (net *dhtNet) localSize() int { return len(net.local.pn) + len(net.local.kn) }

func (net *dhtNet) close() {
	for _, p := range net.parts {
		p.close()
	}
}
