package k8s

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multiaddr"
)

// fakeHost connects to the peers its test marks reachable.
type fakeHost struct {
	id peer.ID

	mu        sync.Mutex
	reachable map[peer.ID]bool
	dials     []peer.ID
	table     atomic.Int64
}

func newFakeHost(id string) *fakeHost {
	return &fakeHost{id: peer.ID(id), reachable: map[peer.ID]bool{}}
}

func (h *fakeHost) ID() peer.ID { return h.id }
func (h *fakeHost) Addrs() []multiaddr.Multiaddr {
	return []multiaddr.Multiaddr{multiaddr.StringCast("/ip4/127.0.0.1/tcp/4001")}
}
func (h *fakeHost) LivePeers() int { return int(h.table.Load()) }
func (h *fakeHost) Connect(ctx context.Context, ai peer.AddrInfo) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.dials = append(h.dials, ai.ID)
	if !h.reachable[ai.ID] {
		return errors.New("connection refused")
	}
	// A connection puts the peer in the table; it never shrinks the table
	// (a round that ends after the test grew it must not undo that).
	h.table.CompareAndSwap(0, 1)
	return nil
}
func (h *fakeHost) setReachable(id peer.ID, ok bool) {
	h.mu.Lock()
	h.reachable[id] = ok
	h.mu.Unlock()
}
func (h *fakeHost) dialCount(id peer.ID) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, d := range h.dials {
		if d == id {
			n++
		}
	}
	return n
}

// fakeDisc answers a settable list of peers.
type fakeDisc struct {
	mu      sync.Mutex
	peers   []peer.AddrInfo
	err     error
	calls   int
	changed chan struct{}
}

func (d *fakeDisc) Name() string { return "fake" }
func (d *fakeDisc) Changed() <-chan struct{} {
	return d.changed
}
func (d *fakeDisc) Discover(context.Context) ([]peer.AddrInfo, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls++
	return append([]peer.AddrInfo(nil), d.peers...), d.err
}
func (d *fakeDisc) set(err error, ids ...peer.ID) {
	d.mu.Lock()
	d.err, d.peers = err, nil
	for _, id := range ids {
		d.peers = append(d.peers, peer.AddrInfo{ID: id, Addrs: []multiaddr.Multiaddr{multiaddr.StringCast("/ip4/127.0.0.9/tcp/4001")}})
	}
	d.mu.Unlock()
	select {
	case d.changed <- struct{}{}:
	default:
	}
}
func (d *fakeDisc) callCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.calls
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func startBootstrap(t *testing.T, h Host, d Discoverer) *Bootstrapper {
	t.Helper()
	b := NewBootstrapper(h, d, BootstrapOptions{MinBackoff: 10 * time.Millisecond, MaxBackoff: 40 * time.Millisecond, CheckInterval: 5 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); b.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return b
}

func TestBootstrapRetriesUntilReachable(t *testing.T) {
	h := newFakeHost("self")
	d := &fakeDisc{changed: make(chan struct{}, 1)}
	d.set(nil, "leader")
	b := startBootstrap(t, h, d)
	eventually(t, "several failed dials", func() bool { return h.dialCount("leader") >= 3 })
	if err := b.Ready(); err == nil {
		t.Fatal("ready while no peer was reachable")
	}
	h.setReachable("leader", true)
	eventually(t, "ready", func() bool { return b.Ready() == nil })
	// Joined: no more rounds while the routing table holds peers.
	n := d.callCount()
	time.Sleep(50 * time.Millisecond)
	if got := d.callCount(); got != n {
		t.Fatalf("discovered %d more times while connected", got-n)
	}
}

func TestBootstrapAloneIsReady(t *testing.T) {
	h := newFakeHost("self")
	d := &fakeDisc{changed: make(chan struct{}, 1)}
	d.set(nil, "self") // only itself: a Lease leader, or a lone pod behind a Service
	b := startBootstrap(t, h, d)
	eventually(t, "ready alone", func() bool { return b.Ready() == nil })
	if n := h.dialCount("self"); n != 0 {
		t.Fatalf("dialed itself %d times", n)
	}
	// Another node connects to this one: it stops looking.
	h.table.Store(1)
	eventually(t, "bootstrap stops looking", func() bool {
		n := d.callCount()
		time.Sleep(100 * time.Millisecond)
		return d.callCount() == n
	})
}

func TestBootstrapAgainWhenAllPeersAreLost(t *testing.T) {
	h := newFakeHost("self")
	h.setReachable("a", true)
	d := &fakeDisc{changed: make(chan struct{}, 1)}
	d.set(nil, "a")
	b := startBootstrap(t, h, d)
	eventually(t, "ready", func() bool { return b.Ready() == nil })
	before := h.dialCount("a")
	h.table.Store(0) // every peer gone
	eventually(t, "a new round", func() bool { return h.dialCount("a") > before })
	if err := b.Ready(); err != nil {
		t.Fatalf("readiness flapped after losing peers: %v", err)
	}
}

func TestBootstrapFollowsAChange(t *testing.T) {
	h := newFakeHost("self")
	h.setReachable("old", true)
	h.setReachable("new", true)
	d := &fakeDisc{changed: make(chan struct{}, 1)}
	d.set(nil, "old")
	startBootstrap(t, h, d)
	eventually(t, "connected to the old leader", func() bool { return h.dialCount("old") >= 1 })
	d.set(nil, "new") // a new leader, while the table is still non-empty
	eventually(t, "connected to the new leader", func() bool { return h.dialCount("new") >= 1 })
}

func TestBootstrapDiscoveryErrorIsReported(t *testing.T) {
	h := newFakeHost("self")
	d := &fakeDisc{changed: make(chan struct{}, 1)}
	d.set(errors.New("lease unreadable"))
	b := startBootstrap(t, h, d)
	eventually(t, "retries", func() bool { return d.callCount() >= 3 })
	err := b.Ready()
	if err == nil || !strings.Contains(err.Error(), "lease unreadable") {
		t.Fatalf("Ready() = %v, want the discovery error", err)
	}
}

// A joined node with fewer than topUpBelow live peers while its discovery
// named more (two nodes that found only each other in a start storm) runs
// more rounds until it has enough; one whose discovery names no more
// peers than it has stays quiet.
func TestBootstrapTopsUpAnIsland(t *testing.T) {
	h := newFakeHost("self")
	h.setReachable("a", true)
	d := &fakeDisc{changed: make(chan struct{}, 1)}
	d.set(nil, "a", "b", "c", "d")
	b := startBootstrap(t, h, d)
	eventually(t, "ready", func() bool { return b.Ready() == nil })
	// Only "a" answers: one live peer of the four named, so it keeps
	// dialling the others, and stays ready meanwhile.
	eventually(t, "more rounds", func() bool { return h.dialCount("b")+h.dialCount("c")+h.dialCount("d") >= 6 })
	if err := b.Ready(); err != nil {
		t.Fatalf("not ready while topping up: %v", err)
	}
	for _, id := range []peer.ID{"b", "c", "d"} {
		h.setReachable(id, true)
	}
	h.table.Store(topUpBelow)
	eventually(t, "bootstrap stops looking", func() bool {
		n := d.callCount()
		time.Sleep(100 * time.Millisecond)
		return d.callCount() == n
	})
}
