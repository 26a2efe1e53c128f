// Package p2p is peerd's peer network: a libp2p host with a Kademlia DHT
// (own protocol prefix, LAN only) that says which nodes hold a blob, and an
// authenticated peer data plane that moves the bytes.
//
// The DHT carries only provider records (blob digest as a CID → peer IDs).
// Bytes travel over HTTP/1.1 on a separate peer port, inside TLS whose
// certificates are bound to both nodes' libp2p keys: the client checks it
// reached the provider the DHT named, and the server answers only askers that
// are connected members of the libp2p network (which, with a swarm key,
// requires the key). A server serves only what it holds locally.
package p2p

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/transfer"
	"github.com/prometheus/client_golang/prometheus"
)

// ProtocolPrefix keeps peerd's DHT apart from every other libp2p network.
const ProtocolPrefix = "/peerd"

// Config configures a Node.
type Config struct {
	// Key is the node's identity (LoadOrCreateKey).
	Key crypto.PrivKey
	// ListenAddr is the libp2p listen multiaddr, e.g. /ip4/0.0.0.0/tcp/30001.
	ListenAddr string
	// PeerAddr is the data-plane listen address (host:port); empty means the
	// listen address's IP with the libp2p port + 1 (or a free port when the
	// libp2p port is 0).
	PeerAddr string
	// Bootstrap peers: multiaddrs ending in /p2p/<id>.
	Bootstrap []string
	// SwarmKey, when set, makes the network private: peers without the same
	// key cannot connect (and so cannot read blobs).
	SwarmKey pnet.PSK
	// ResolveTimeout bounds one provider lookup; ResolveRetries more tries
	// follow when it finds nobody.
	ResolveTimeout time.Duration
	ResolveRetries int
	// ReprovideInterval is how often every held blob is advertised again.
	ReprovideInterval time.Duration
	// Stores are the local stores served to peers, asked in order.
	Stores     []LocalStore
	Registerer prometheus.Registerer
	Logger     *slog.Logger
	UserAgent  string
	// PeerBook, when set, is a file where the node remembers the peers it
	// was connected to, and dials them after a restart (peerbook.go).
	PeerBook string
	// Zone is the zone the node tells its peers (SetZone changes it).
	Zone string
	// UploadStreams bounds the transfers the node serves peers at once
	// (DefaultUploadStreams when 0), each asker held to its fair share;
	// UploadRate, when positive, caps the bytes per second of all of them
	// together. Past either, askers are told "busy" and go elsewhere.
	UploadStreams int
	UploadRate    int64
	// Transfers, when set, records what the node serves to peers (one
	// record per peer and blob, range requests folded together).
	Transfers *transfer.Log
}

// Direction of peer bytes, for OnPeerBytes hooks.
type Direction string

const (
	Received Direction = "received"
	Served   Direction = "served"
)

// Node is a running peer: libp2p host, DHT, advertiser, data-plane server
// and client.
type Node struct {
	cfg  Config
	log  *slog.Logger
	m    *metrics
	host host.Host
	dht  *dht.IpfsDHT
	self peer.ID

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	bootMu     sync.Mutex
	bootstrap  map[peer.ID]peer.AddrInfo
	bootKick   chan struct{}
	remembered []peer.AddrInfo // from the peer book, dialled like bootstrap peers
	// joined is set when Connect reached a peer the node was not connected
	// to: the bootstrap loop then refreshes every bucket of the routing table.
	joined atomic.Bool

	adv     *advertiser[blob.Key]
	holders *holders // which stores hold each advertised blob
	server  *dataServer
	client  *dataClient
	source  *Source

	hooksMu sync.RWMutex
	hooks   []func(Direction, peer.ID, int64)
	stats   peerStats // bytes to and from each peer
	zones   zones     // this node's zone and its peers'
	// zoneBytes: blob bytes received and served by zone relation.
	zoneBytes zoneCounters

	closeOnce sync.Once
	closeErr  error
	lookups   atomic.Int64
}

// New starts the host, the DHT, the data-plane server and the background
// loops (bootstrap, advertising). Close stops them.
func New(ctx context.Context, cfg Config) (*Node, error) {
	cfg, err := withDefaults(cfg)
	if err != nil {
		return nil, err
	}
	boot, err := ParseBootstrap(cfg.Bootstrap)
	if err != nil {
		return nil, err
	}
	listen, err := ma.NewMultiaddr(cfg.ListenAddr)
	if err != nil {
		return nil, fmt.Errorf("--p2p-addr %q: %w", cfg.ListenAddr, err)
	}
	reg := cfg.Registerer
	if reg == nil {
		reg = prometheus.NewRegistry()
	}

	n := &Node{cfg: cfg, log: cfg.Logger.With("component", "p2p"), m: newMetrics(reg),
		bootstrap: map[peer.ID]peer.AddrInfo{}, bootKick: make(chan struct{}, 1)}
	n.self, err = peer.IDFromPrivateKey(cfg.Key)
	if err != nil {
		return nil, err
	}
	if n.host, err = newHost(cfg, listen, reg); err != nil {
		return nil, err
	}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	if n.dht, err = n.newDHT(); err != nil {
		n.host.Close()
		return nil, fmt.Errorf("start DHT: %w", err)
	}
	if err := n.startDataPlane(); err != nil {
		n.dht.Close()
		n.host.Close()
		return nil, err
	}
	n.registerGauges(reg)
	n.watchConnections()
	n.AddBootstrap(boot...)
	n.remembered = loadPeerBook(cfg.PeerBook)
	n.startLoops()
	n.log.Info("p2p node started", "peer-id", n.self.String(), "addrs", fmt.Sprint(n.Addrs()), "peer-addr", n.server.addr(),
		"bootstrap", len(boot), "private-network", cfg.SwarmKey != nil)
	return n, nil
}

// withDefaults checks cfg and fills in what it leaves unset.
func withDefaults(cfg Config) (Config, error) {
	if cfg.Key == nil {
		return cfg, errors.New("p2p: no identity key")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ResolveTimeout <= 0 {
		cfg.ResolveTimeout = 20 * time.Millisecond
	}
	if cfg.ResolveRetries < 0 {
		cfg.ResolveRetries = 0
	}
	if cfg.ReprovideInterval <= 0 {
		cfg.ReprovideInterval = time.Hour
	}
	if cfg.ListenAddr == "" {
		cfg.ListenAddr = "/ip4/0.0.0.0/tcp/30001"
	}
	if cfg.PeerAddr == "" {
		pa, err := DefaultPeerAddr(cfg.ListenAddr)
		if err != nil {
			return cfg, err
		}
		cfg.PeerAddr = pa
	}
	return cfg, nil
}

// startDataPlane makes the data-plane client and server, the peer source
// reading through them, and the advertiser.
func (n *Node) startDataPlane() error {
	var err error
	n.client = newDataClient(n)
	n.server, err = newDataServer(n, n.cfg.PeerAddr, n.cfg.Stores)
	if err != nil {
		return err
	}
	n.source = newSource(n.self, &dhtFinder{n: n}, n.client, n.m, n.log, n.cfg.ResolveTimeout, n.cfg.ResolveRetries)
	n.source.zones = &n.zones
	n.source.learnZones = n.client.learnZones
	n.source.bg = n.ctx
	n.adv = newBlobAdvertiser(n, n.cfg.ReprovideInterval)
	n.holders = newHolders(n.adv)
	n.SetZone(n.cfg.Zone)
	return nil
}

// registerGauges registers the gauges read from the host and the DHT.
func (n *Node) registerGauges(reg prometheus.Registerer) {
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "peerd_p2p_connected_peers", Help: "Peers with an open libp2p connection."},
			func() float64 { return float64(len(n.host.Network().Peers())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "peerd_p2p_routing_table_peers", Help: "Peers in the DHT routing table."},
			func() float64 { return float64(n.RoutingTableSize()) }),
	)
}

// watchConnections reacts to peers connecting and disconnecting.
func (n *Node) watchConnections() {
	n.host.Network().Notify(&network.NotifyBundle{
		// Losing the last peer restarts the bootstrap backoff at once
		// instead of waiting out the connected-state poll interval.
		DisconnectedF: func(nw network.Network, _ network.Conn) {
			if len(nw.Peers()) == 0 {
				n.kickBootstrap()
			}
		},
		// A peer that connects again (a restarted node) gets a fresh chance:
		// its dial failures while it was down say nothing about it now.
		// With zones, its zone is asked at once (in the background), so the
		// first chunks of a rollout already know which holders share ours.
		ConnectedF: func(_ network.Network, c network.Conn) {
			n.source.succeeded(c.RemotePeer())
			if n.Zone() != "" && n.client != nil {
				n.client.learnZones([]peer.AddrInfo{{ID: c.RemotePeer()}})
			}
		},
	})
}

// startLoops starts the data-plane server and the background loops; Close
// waits for them.
func (n *Node) startLoops() {
	n.wg.Add(4)
	go func() { defer n.wg.Done(); n.server.serve() }()
	go func() { defer n.wg.Done(); n.clientGC() }()
	go func() { defer n.wg.Done(); n.bootstrapLoop() }()
	go func() { defer n.wg.Done(); n.adv.run(n.ctx) }()
}

// ID is the node's peer ID.
func (n *Node) ID() peer.ID { return n.self }

// Addrs are the node's full libp2p addresses, each ending in /p2p/<id>.
func (n *Node) Addrs() []ma.Multiaddr {
	addrs, err := peer.AddrInfoToP2pAddrs(&peer.AddrInfo{ID: n.self, Addrs: n.host.Addrs()})
	if err != nil {
		return nil
	}
	return addrs
}

// Host exposes the libp2p host (for tests and diagnostics).
func (n *Node) Host() host.Host { return n.host }

// PeerAddr is the data plane's listen address.
func (n *Node) PeerAddr() string { return n.server.addr() }

// Connect dials a peer (with a timeout) and adds it to the DHT.
func (n *Node) Connect(ctx context.Context, ai peer.AddrInfo) error {
	if ai.ID == n.self {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	was := n.connected(ai.ID)
	alone := n.ConnectedPeers() == 0
	if err := n.host.Connect(ctx, ai); err != nil {
		return fmt.Errorf("connect to peer %s: %w", ai.ID, err)
	}
	if !was {
		if alone {
			n.wg.Go(func() { n.releaseWhenJoined(ai.ID) })
		}
		n.joined.Store(true)
		n.kickBootstrap()
	}
	return nil
}

// RoutingTableSize is the number of peers in the DHT routing table.
func (n *Node) RoutingTableSize() int { return n.dht.RoutingTable().Size() }

// RefreshRoutingTable fills the routing table from the network now and
// waits until that finished (the node does it by itself after joining and
// then periodically).
func (n *Node) RefreshRoutingTable(ctx context.Context) error {
	select {
	case err := <-n.dht.RefreshRoutingTable():
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ConnectedPeers is the number of peers with an open libp2p connection.
func (n *Node) ConnectedPeers() int { return len(n.host.Network().Peers()) }

// Ready reports nil when the node takes part in the network: it is connected
// to a peer, or it has nobody to bootstrap from (a lone first node, or the
// node others bootstrap from, is ready by itself).
func (n *Node) Ready() error {
	if n.ConnectedPeers() > 0 {
		return nil
	}
	if len(n.bootstrapPeers()) == 0 {
		return nil
	}
	return errors.New("p2p: not connected to any peer yet (bootstrap peers unreachable)")
}

// AddStore adds a local store served to peers after the configured ones
// (e.g. a containerd content store).
func (n *Node) AddStore(s LocalStore) { n.server.addStore(s) }

// clientGC closes kept-alive connections to peers unused for a while.
func (n *Node) clientGC() {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
			n.client.gc(5 * time.Minute)
		}
	}
}

// Source is the peer source for the content cache.
func (n *Node) Source() *Source { return n.source }

// OnPeerBytes registers a hook called when blob bytes arrive from or are
// served to a peer (for example to emit a P2PActive event). Hooks must not block.
func (n *Node) OnPeerBytes(f func(dir Direction, p peer.ID, bytes int64)) {
	n.hooksMu.Lock()
	n.hooks = append(n.hooks, f)
	n.hooksMu.Unlock()
}

func (n *Node) peerHooks(dir Direction, p peer.ID, b int64) {
	if b <= 0 {
		return
	}
	n.hooksMu.RLock()
	hs := n.hooks
	n.hooksMu.RUnlock()
	for _, h := range hs {
		h(dir, p, b)
	}
}

// Close stops the loops, the data plane, the DHT and the host.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		start := time.Now()
		if err := savePeerBook(n.cfg.PeerBook, n.connectedAddrInfos()); err != nil {
			n.log.Warn("save peer book", "path", n.cfg.PeerBook, "err", err)
		}
		n.cancel()
		var errs []error
		if err := n.server.close(); err != nil {
			errs = append(errs, fmt.Errorf("close peer data plane: %w", err))
		}
		t1 := time.Now()
		n.wg.Wait()
		n.client.close()
		t2 := time.Now()
		if err := n.dht.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close DHT: %w", err))
		}
		t3 := time.Now()
		if err := n.host.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close libp2p host: %w", err))
		}
		n.log.Debug("p2p node closed", "data-plane", t1.Sub(start), "loops", t2.Sub(t1), "dht", t3.Sub(t2), "host", time.Since(t3))
		n.closeErr = errors.Join(errs...)
	})
	return n.closeErr
}

// connected reports whether p has an open libp2p connection to us.
func (n *Node) connected(p peer.ID) bool {
	return n.host.Network().Connectedness(p) == network.Connected
}
