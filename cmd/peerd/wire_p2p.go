package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/p2p"
)

// p2pConfig holds the flags of the peer network (libp2p host, DHT, peer data plane).
type p2pConfig struct {
	Addr              string
	PeerAddr          string
	Bootstrap         listFlag
	SwarmKeyFile      string
	ResolveTimeout    time.Duration
	ResolveRetries    int
	ReprovideInterval time.Duration
	SwarmWait         time.Duration
	SwarmGather       time.Duration
	MissHedge         time.Duration
	UploadStreams     int
	UploadRate        byteSize
	Zone              string
}

func registerP2PFlags(fs *flag.FlagSet, c *p2pConfig) {
	fs.StringVar(&c.Addr, "p2p-addr", "/ip4/0.0.0.0/tcp/30001", "libp2p listen multiaddr; a node bound to one IP advertises only that IP")
	fs.StringVar(&c.PeerAddr, "peer-addr", "", "peer data-plane listen address host:port (default: the --p2p-addr IP, port + 1)")
	fs.Var(&c.Bootstrap, "bootstrap", "bootstrap peer multiaddr ending in /p2p/<peer id> (repeatable, comma-separated)")
	fs.StringVar(&c.SwarmKeyFile, "swarm-key-file", "", "libp2p private-network key file: only nodes holding the same key can join")
	fs.DurationVar(&c.ResolveTimeout, "resolve-timeout", 20*time.Millisecond, "time one DHT provider lookup may take")
	fs.IntVar(&c.ResolveRetries, "resolve-retries", 1, "further lookups when one fails outright (no peer to ask); a slow one is not started over but runs on in the background")
	fs.DurationVar(&c.ReprovideInterval, "reprovide-interval", time.Hour, "how often held blobs are advertised again")
	fs.DurationVar(&c.SwarmGather, "swarm-gather", 250*time.Millisecond, "when the first lookup of a blob this node starts pulling finds nobody, the chunk the reader waits for comes from the origin at once and the rest of the pull looks again after this long, to see nodes that started at the same moment: a cold burst then fetches each chunk about once (0: no second look, each node fetches its first read-ahead window itself)")
	fs.DurationVar(&c.MissHedge, "miss-hedge", 10*time.Millisecond, "how long a cold read's first chunk waits for the blob's first DHT lookup before it starts from the origin anyway (the lookup's answer may still hand the chunk to a peer): longer saves origin bytes when lookups are slow, at the price of a cold miss's first byte (with --swarm-gather 0 the chunk waits for the lookup, up to --resolve-timeout)")
	fs.StringVar(&c.Zone, "zone", "", "this node's zone, told to peers: readers prefer holders in their own zone (default in Kubernetes: the Node's topology.kubernetes.io/zone label)")
	fs.IntVar(&c.UploadStreams, "peer-upload-streams", p2p.DefaultUploadStreams, "most transfers this node serves peers at once, each asker held to its fair share; past it askers are told \"busy\" and read from another holder")
	fs.Var(&c.UploadRate, "peer-upload-rate", "cap on the bytes per second this node serves all peers together, e.g. 20MiB (0: no cap); never applies to the node's own clients")
	fs.DurationVar(&c.SwarmWait, "swarm-wait", 8*time.Second, "how long this node lets a peer wait for a chunk of a blob both are pulling when the chunk is this node's to fetch from the origin (0: answer \"don't have\" at once, no swarming)")
}

func (c *p2pConfig) validate() error {
	var errs []error
	if c.ResolveTimeout <= 0 || c.ResolveTimeout > time.Minute {
		errs = append(errs, fmt.Errorf("--resolve-timeout %v: want more than 0 and at most 1m", c.ResolveTimeout))
	}
	if c.ResolveRetries < 0 || c.ResolveRetries > 10 {
		errs = append(errs, fmt.Errorf("--resolve-retries %d: want 0 to 10", c.ResolveRetries))
	}
	if c.SwarmGather < 0 || c.SwarmGather > 5*time.Second {
		errs = append(errs, fmt.Errorf("--swarm-gather %v: want 0 to 5s", c.SwarmGather))
	}
	if c.MissHedge <= 0 || c.MissHedge > time.Minute {
		errs = append(errs, fmt.Errorf("--miss-hedge %v: want more than 0 and at most 1m", c.MissHedge))
	}
	if c.SwarmWait < 0 || c.SwarmWait > 9*time.Second {
		// Peers give up on response headers after 10s.
		errs = append(errs, fmt.Errorf("--swarm-wait %v: want 0 to 9s", c.SwarmWait))
	}
	if c.UploadStreams < 1 || c.UploadStreams > 4096 {
		errs = append(errs, fmt.Errorf("--peer-upload-streams %d: want 1 to 4096", c.UploadStreams))
	}
	if c.UploadRate < 0 || (c.UploadRate > 0 && c.UploadRate < 64<<10) {
		errs = append(errs, fmt.Errorf("--peer-upload-rate %s: want 0 (no cap) or at least 64KiB", c.UploadRate.String()))
	}
	if c.ReprovideInterval < time.Minute {
		errs = append(errs, fmt.Errorf("--reprovide-interval %v: want at least 1m", c.ReprovideInterval))
	}
	if _, err := p2p.ParseBootstrap(c.Bootstrap.items); err != nil {
		errs = append(errs, fmt.Errorf("--bootstrap: %w", err))
	}
	return errors.Join(errs...)
}

// startP2P starts the libp2p host and DHT and sets a.peers.
func startP2P(ctx context.Context, a *app) error {
	c := &a.cfg.P2P
	if err := c.validate(); err != nil {
		return err
	}
	key, err := p2p.LoadOrCreateKey(a.cfg.DataDir)
	if err != nil {
		return err
	}
	// The data plane may serve before New returns; until then nothing swarms.
	var swarm atomic.Pointer[p2p.Source]
	cfg := p2p.Config{
		Key:               key,
		ListenAddr:        c.Addr,
		PeerAddr:          c.PeerAddr,
		Bootstrap:         c.Bootstrap.items,
		ResolveTimeout:    c.ResolveTimeout,
		ResolveRetries:    c.ResolveRetries,
		ReprovideInterval: c.ReprovideInterval,
		Registerer:        a.reg,
		Logger:            a.log,
		UserAgent:         "peerd/" + version,
		PeerBook:          filepath.Join(a.cfg.DataDir, "peers.json"),
		Transfers:         a.transfers,
		Zone:              c.Zone,
		UploadStreams:     c.UploadStreams,
		UploadRate:        int64(c.UploadRate),
		Stores:            []p2p.LocalStore{cacheStore{a: a, swarmWait: c.SwarmWait, swarm: &swarm}},
	}
	if c.SwarmKeyFile != "" {
		if cfg.SwarmKey, err = p2p.LoadSwarmKey(c.SwarmKeyFile); err != nil {
			return fmt.Errorf("--swarm-key-file: %w", err)
		}
	}
	node, err := p2p.New(ctx, cfg)
	if err != nil {
		return err
	}
	a.p2p = node
	a.onStop(func(context.Context) error {
		a.cache.SetAnnouncer(nil)
		return node.Close()
	})
	// Listen first, then list: a blob added in between is announced twice,
	// which is harmless; none is missed.
	announce := node.Announcer("cache")
	a.cache.SetAnnouncer(announce)
	for _, info := range a.cache.List() {
		announce.Holding(info.Key)
	}
	src := node.Source()
	src.SetSwarmGather(c.SwarmGather)
	src.SetMissHedge(c.MissHedge)
	// Askers wait for busy holders as long as a holder lets them wait for
	// a chunk in flight; then the origin.
	src.SetBusyWait(c.SwarmWait)
	a.reg.MustRegister(src.Collectors()...)
	swarm.Store(src)
	a.peers = src
	a.readyChecks = append(a.readyChecks, node.Ready)
	return nil
}

// cacheStore is the cache as the peer server's store.
type cacheStore struct {
	a         *app
	swarmWait time.Duration
	swarm     *atomic.Pointer[p2p.Source]
}

var _ p2p.WholeStore = cacheStore{}

func (s cacheStore) OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	src := s.swarm.Load()
	if s.swarmWait <= 0 || src == nil {
		r, size, err := s.a.cache.OpenLocal(k, off, n)
		if err != nil {
			return nil, size, err
		}
		return r, size, nil
	}
	// A chunk this node is to fetch from the origin for a blob
	// others pull too is worth a short wait (README: Swarming).
	ctx, cancel := context.WithTimeout(context.Background(), s.swarmWait)
	defer cancel()
	r, size, err := s.a.cache.AwaitLocal(ctx, k, off, n, func(o int64) bool { return src.Owns(k, o) })
	if err != nil {
		return nil, size, err // never a typed nil inside the interface
	}
	return r, size, nil
}

// HoldsWhole: a verified blob is whole; its askers can serve each other.
func (s cacheStore) HoldsWhole(k blob.Key) bool {
	i, ok := s.a.cache.Stat(k)
	return ok && i.Verified
}
