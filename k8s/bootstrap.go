// Package k8s joins a node to the peer network inside Kubernetes and reports
// how that goes: bootstrap peers from a coordination.k8s.io Lease leader or a
// headless Service's DNS name, with retries and re-bootstrap when a node
// loses every peer; and Events on the node's Node object (P2PConnected,
// P2PDisconnected, P2PActive, P2PFailed).
//
// The package talks to the p2p layer only through the small Host interface
// below, so it is tested with real libp2p hosts and with fakes alike.
package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multiaddr"
)

// Host is what bootstrap needs from the node's libp2p side.
type Host interface {
	ID() peer.ID
	// Addrs are the node's full addresses, each ending in /p2p/<ID>.
	Addrs() []multiaddr.Multiaddr
	Connect(ctx context.Context, ai peer.AddrInfo) error
	// LivePeers counts the peers in the DHT routing table that the node is
	// connected to. The routing table alone is not enough: it keeps peers
	// that died until a refresh evicts them, minutes later.
	LivePeers() int
}

// Discoverer names the peers a node should connect to first.
type Discoverer interface {
	// Name labels the mode in logs and metrics ("k8s-lease", "dns", ...).
	Name() string
	// Discover returns peers to try, never the node itself. An empty answer
	// with a nil error means nobody else is known: the node is alone (e.g. it
	// is the Lease leader), which is a fine state to be ready in.
	Discover(ctx context.Context) ([]peer.AddrInfo, error)
	// Changed signals that Discover's answer may have changed (a new
	// leader). Nil when it never does.
	Changed() <-chan struct{}
}

// ErrPending is wrapped by Discover errors that say "not yet" rather than
// "broken": the source has no answer so far but expects one.
var ErrPending = errors.New("not known yet")

// BootstrapOptions tune the bootstrap loop; zero values take the defaults.
type BootstrapOptions struct {
	// MaxPeers bounds how many discovered peers one round connects to (3).
	MaxPeers int
	// MinBackoff and MaxBackoff bound the wait after a failed round (1s, 1m).
	MinBackoff, MaxBackoff time.Duration
	// CheckInterval is how often the routing table is checked for emptiness (5s).
	CheckInterval time.Duration
	// DialTimeout bounds one connection attempt (10s).
	DialTimeout time.Duration
	Logger      *slog.Logger
	Metrics     *Metrics
}

func (o *BootstrapOptions) defaults() {
	if o.MaxPeers <= 0 {
		o.MaxPeers = 3
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = time.Second
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = max(time.Minute, o.MinBackoff)
	}
	if o.CheckInterval <= 0 {
		o.CheckInterval = 5 * time.Second
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
}

// Bootstrapper keeps a node joined: it connects to discovered peers, retries
// with backoff, and starts over when the node has no peer left or the
// Discoverer's answer changes.
type Bootstrapper struct {
	host Host
	disc Discoverer
	opts BootstrapOptions
	log  *slog.Logger

	mu      sync.Mutex
	done    bool  // a round ended connected or alone
	lastErr error // why the last round failed, for Ready
	known   int   // peers the last discovery named (besides this node)
}

// topUpBelow is the number of live peers under which a joined node runs
// another round when its discovery named more peers than it has: two nodes
// that dialled only each other while everyone else refused (a start storm)
// would otherwise stay an island, each content with one live peer.
const topUpBelow = 3

// NewBootstrapper makes a bootstrap loop; Run starts it.
func NewBootstrapper(h Host, d Discoverer, opts BootstrapOptions) *Bootstrapper {
	opts.defaults()
	return &Bootstrapper{host: h, disc: d, opts: opts, log: opts.Logger.With("bootstrap", d.Name())}
}

func (b *Bootstrapper) markJoined() {
	b.mu.Lock()
	b.done, b.lastErr = true, nil
	b.mu.Unlock()
}

// errNotYet is Ready's answer before the first round finished.
var errNotYet = errors.New("bootstrap has not run yet")

// Ready reports nil once one round connected to a peer or found the node
// alone. Later losses don't flip it back: a node that lost its peers still
// serves from its cache and the origin, and re-bootstraps on its own;
// flapping readiness would only stall DaemonSet rollouts.
func (b *Bootstrapper) Ready() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return nil
	}
	if b.lastErr != nil {
		return fmt.Errorf("%s bootstrap: %w", b.disc.Name(), b.lastErr)
	}
	return fmt.Errorf("%s bootstrap: %w", b.disc.Name(), errNotYet)
}

// Run bootstraps until ctx ends.
func (b *Bootstrapper) Run(ctx context.Context) {
	backoff := b.opts.MinBackoff
	need := true
	check := time.NewTicker(b.opts.CheckInterval)
	defer check.Stop()
	for {
		var wait time.Duration // zero: no retry pending, just watch
		if need {
			connected, err := b.round(ctx)
			if ctx.Err() != nil {
				return
			}
			switch {
			case errors.Is(err, ErrPending):
				// Expected at start (the Lease not read yet, no leader yet):
				// the Discoverer signals Changed when that moves.
				b.log.Debug("bootstrap source not ready yet", "err", err, "retry_in", backoff)
				wait = jitter(backoff)
				backoff = min(2*backoff, b.opts.MaxBackoff)
			case err != nil:
				b.log.Warn("bootstrap round failed; retrying", "err", err, "retry_in", backoff)
				wait = jitter(backoff)
				backoff = min(2*backoff, b.opts.MaxBackoff)
			case connected == 0:
				// Alone: look again now and then, slower and slower, in case
				// peers appear that never dial this node themselves.
				wait = jitter(backoff)
				backoff = min(2*backoff, b.opts.MaxBackoff)
			default:
				backoff = b.opts.MinBackoff
				need = false
			}
		}
		if !b.waitNext(ctx, check.C, wait, &need, &backoff) {
			return
		}
	}
}

// waitNext blocks until the next round is due, and reports false when ctx
// ended. Between rounds it watches the routing table: a connected node that
// lost every peer starts over at once, and an alone node that others found
// stops looking.
func (b *Bootstrapper) waitNext(ctx context.Context, check <-chan time.Time, wait time.Duration, need *bool, backoff *time.Duration) bool {
	var due <-chan time.Time
	if wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		due = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return false
		case <-b.disc.Changed():
			b.log.Info("bootstrap source changed; bootstrapping again")
			*need, *backoff = true, b.opts.MinBackoff
			return true
		case <-due:
			return true
		case <-check:
			size := b.host.LivePeers()
			switch {
			case !*need && size == 0:
				b.log.Warn("no live peer left; bootstrapping again")
				*need, *backoff = true, b.opts.MinBackoff
				return true
			case !*need && size < topUpBelow && b.knows() > size:
				b.log.Info("few live peers while discovery names more; connecting to more", "peers", size, "named", b.knows())
				*need, *backoff = true, b.opts.MinBackoff
				return true
			case *need && size > 0:
				// Alone or failing, yet the node has live peers (others dialed
				// it, or it kept some from before a change): joined.
				b.log.Info("the node has live peers; bootstrap is done", "peers", size)
				b.markJoined()
				*need, *backoff = false, b.opts.MinBackoff
				return true
			}
			// Otherwise keep waiting out a pending backoff: a failing source
			// is not retried faster than the backoff allows.
		}
	}
}

// round discovers peers and connects to a few of them. It returns how many
// connections succeeded; 0 with a nil error means the node is alone.
func (b *Bootstrapper) round(ctx context.Context) (int, error) {
	peers, err := b.disc.Discover(ctx)
	if err != nil {
		b.finish(0, err)
		return 0, err
	}
	self := b.host.ID()
	peers = slices.DeleteFunc(peers, func(p peer.AddrInfo) bool { return p.ID == self || len(p.Addrs) == 0 })
	b.mu.Lock()
	b.known = len(peers)
	b.mu.Unlock()
	if len(peers) == 0 {
		b.log.Debug("no other peer known; this node is alone for now")
		b.finish(0, nil)
		return 0, nil
	}
	rand.Shuffle(len(peers), func(i, j int) { peers[i], peers[j] = peers[j], peers[i] })
	if len(peers) > b.opts.MaxPeers {
		peers = peers[:b.opts.MaxPeers]
	}
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		connected int
		errs      []error
	)
	for _, p := range peers {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, b.opts.DialTimeout)
			defer cancel()
			err := b.host.Connect(cctx, p)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Errorf("connect %s: %w", p.ID, err))
				return
			}
			connected++
			b.log.Info("connected to bootstrap peer", "peer", p.ID.String())
		})
	}
	wg.Wait()
	if connected == 0 {
		err := fmt.Errorf("no bootstrap peer reachable: %w", errors.Join(errs...))
		b.finish(0, err)
		return 0, err
	}
	b.finish(connected, nil)
	return connected, nil
}

func (b *Bootstrapper) finish(connected int, err error) {
	result := "connected"
	switch {
	case err != nil:
		result = "failed"
	case connected == 0:
		result = "alone"
	}
	b.opts.Metrics.round(b.disc.Name(), result)
	if err != nil {
		b.mu.Lock()
		b.lastErr = err
		b.mu.Unlock()
		return
	}
	b.markJoined()
}

// knows is how many peers the last discovery named.
func (b *Bootstrapper) knows() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.known
}

// jitter spreads retries of many nodes over [d/2, d).
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}
