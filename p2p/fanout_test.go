package p2p

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestFanoutGivesABlobToAFewAskers(t *testing.T) {
	var f fanout
	k := testKey()
	now := time.Now()
	a, b, c, d := newPeerID(t), newPeerID(t), newPeerID(t), newPeerID(t)
	if f.admit(k, a, "a", "a", false, now) != "" || f.admit(k, b, "", "a", false, now) != "" {
		t.Fatal("the first two askers of the holder's zone (or an unknown one) are refused")
	}
	if why := f.admit(k, c, "a", "a", false, now); why != "fanout" {
		t.Fatalf("a third asker of the zone: %q, want fanout", why)
	}
	// An asker with its turn keeps it for its next chunks.
	if f.admit(k, a, "a", "a", false, now.Add(copiesWindow/2)) != "" {
		t.Fatal("an asker with its turn is refused its next chunk")
	}
	// Another blob is counted on its own.
	if f.admit(testKeyN(7), c, "a", "a", false, now) != "" {
		t.Fatal("an asker of another blob is refused")
	}
	// One asker per other zone crosses, whatever the local count.
	if f.admit(k, d, "b", "a", false, now) != "" {
		t.Fatal("the first asker from zone b is refused")
	}
	e := newPeerID(t)
	if why := f.admit(k, e, "b", "a", false, now); why != "zone" {
		t.Fatalf("a second asker from zone b: %q, want zone", why)
	}
	if f.admit(k, newPeerID(t), "c", "a", false, now) != "" {
		t.Fatal("the first asker from zone c is refused")
	}
	// An asker that waited its turn is served past both bounds.
	if f.admit(k, e, "b", "a", true, now) != "" || f.admit(k, c, "a", "a", true, now) != "" {
		t.Fatal("insisting askers are refused")
	}
	// Turns end copiesWindow after the asker's last request: b's first.
	later := now.Add(copiesWindow)
	if f.admit(k, newPeerID(t), "a", "a", false, later.Add(-time.Millisecond)) != "fanout" {
		t.Fatal("a turn ended before copiesWindow")
	}
	// At later, b's and c's turns ended; a's (renewed at window/2) not.
	if f.admit(k, newPeerID(t), "a", "a", false, later) != "" {
		t.Fatal("a turn outlived copiesWindow after its asker's last request")
	}
	if f.admit(k, newPeerID(t), "a", "a", false, later) != "fanout" {
		t.Fatal("the renewed turn was dropped")
	}
}

func TestFanoutForgetsOldTurnsPastItsBound(t *testing.T) {
	var f fanout
	now := time.Now()
	p := newPeerID(t)
	for i := range maxFanoutBlobs + 10 {
		f.admit(testKeyN(i), p, "", "", false, now)
		now = now.Add(copiesWindow / 1000)
	}
	if n := len(f.byBlob); n > maxFanoutBlobs {
		t.Fatalf("%d blobs tracked, bound %d", n, maxFanoutBlobs)
	}
}

// stepClock gives s a clock that stands still until s waits, then jumps by
// the wait at once; it returns the waits, in order.
func stepClock(s *Source) *[]time.Duration {
	var mu sync.Mutex
	clock := time.Now()
	var waits []time.Duration
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	s.after = func(d time.Duration) <-chan time.Time {
		mu.Lock()
		defer mu.Unlock()
		waits = append(waits, d)
		clock = clock.Add(d)
		ch := make(chan time.Time, 1)
		ch <- clock
		return ch
	}
	return &waits
}

// A holder that sends the asker to wait for others is waited for, then
// asked once more, insisting: the bytes come from it, never "don't have"
// (which would send the chunk to the origin).
func TestSourceInsistsAfterWaitingForOthers(t *testing.T) {
	s, _, g, ids := setup(t, "fanout", "fanout")
	waits := stepClock(s)
	s.SetBusyWait(time.Second)
	b, origin, err := readAll(t, s, 0, 1<<20)
	if err != nil || !bytes.Equal(b, g.data[:1<<20]) || origin != ids[0].String() {
		t.Fatalf("%d bytes from %s, %v; want the first holder, insisting", len(b), origin, err)
	}
	if len(*waits) != int(time.Second/fanoutRetry) {
		t.Fatalf("waited %v, want turns of %v for a second", *waits, fanoutRetry)
	}
	calls := g.calls()
	if last := calls[len(calls)-1]; !last.insist || last.p != ids[0] {
		t.Fatalf("last request %+v, want an insisting one to the first holder", last)
	}
	for _, c := range calls[:len(calls)-1] {
		if c.insist {
			t.Fatalf("insisted before the wait was over: %+v", calls)
		}
	}
}

// The askers a holder served first may have left (their provider records
// outlive them): when every other provider fails when asked, nobody is left
// to wait for, and the asker insists at the holder after one turn instead
// of waiting out fanoutWait.
func TestSourceInsistsAtOnceWhenTheOthersAreGone(t *testing.T) {
	s, _, g, ids := setup(t, "fanout", "err", "err")
	waits := stepClock(s)
	s.SetBusyWait(time.Minute)
	b, origin, err := readAll(t, s, 0, 1<<20)
	if err != nil || !bytes.Equal(b, g.data[:1<<20]) || origin != ids[0].String() {
		t.Fatalf("%d bytes from %s, %v; want the holder, insisting", len(b), origin, err)
	}
	if len(*waits) != 1 {
		t.Fatalf("waited %v, want one turn of %v", *waits, fanoutRetry)
	}
	calls := g.calls()
	if last := calls[len(calls)-1]; !last.insist || last.p != ids[0] {
		t.Fatalf("last request %+v, want an insisting one to the holder", last)
	}
}

// A "zone" answer (another node of this zone is crossing for the blob)
// makes the asker ask only its zone's holders until the one crossing
// serves it, not the other zone's holders.
func TestZoneBusyKeepsAskingTheZone(t *testing.T) {
	s, _, g, ids := setup(t, "zone", "notfound", "ok")
	s.zones = &zones{}
	mine := "b"
	s.zones.self.Store(&mine)
	s.zones.learn(ids[0], "a")
	s.zones.learn(ids[1], "b") // crossing now; holds the blob once verified
	s.zones.learn(ids[2], "a") // another holder in zone a
	// This node is not its zone's crosser for the blob (ids[1] is).
	for rank(testKey(), 0, []peer.ID{s.self, ids[1]})[0] != ids[1] {
		s.self = newPeerID(t)
	}
	var mu sync.Mutex
	clock := time.Now()
	turns := 0
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	s.after = func(d time.Duration) <-chan time.Time {
		mu.Lock()
		defer mu.Unlock()
		clock = clock.Add(d)
		if turns++; turns == 3 {
			g.mu.Lock()
			g.behave[ids[1]] = "ok" // verified: it serves its zone
			g.mu.Unlock()
		}
		ch := make(chan time.Time, 1)
		ch <- clock
		return ch
	}
	s.SetBusyWait(8 * time.Second)
	// ids[2] (zone a) holds it too, but is asked only in the first round,
	// after the zone answer: the order is zone b first, then a.
	s.noSpread = true
	g.mu.Lock()
	g.behave[ids[2]] = "zone"
	g.mu.Unlock()
	b, origin, err := readAll(t, s, 0, 1<<20)
	if err != nil || !bytes.Equal(b, g.data[:1<<20]) || origin != ids[1].String() {
		t.Fatalf("%d bytes from %s, %v; want the holder of this zone once it could serve", len(b), origin, err)
	}
	// Every request after the second to this zone's holder went to it.
	seen := 0
	for _, c := range g.calls() {
		if c.p == ids[1] {
			seen++
			continue
		}
		if seen >= 2 {
			t.Fatalf("asked %s of zone a after its zone answer: %+v", c.p, g.calls())
		}
	}
	if seen < 3 {
		t.Fatalf("this zone's holder asked %d times, want a turn until it served", seen)
	}
}

func testKeyN(i int) blob.Key { return blob.Key(fmt.Sprintf("sha256:%064x", i)) }

// Once a provider is known to hold a blob whole, the nodes of a zone let
// one of them cross for it (the first by rendezvous of themselves and the
// providers known in their zone) and ask only their zone otherwise.
func TestZoneCrosserIsTheSameForEveryNodeOfTheZone(t *testing.T) {
	seed, x, y := newPeerID(t), newPeerID(t), newPeerID(t)
	source := func(self peer.ID) *Source {
		s := newSource(self, &fakeFinder{}, &fakeGetter{}, nil, nil, time.Second, 1)
		s.zones = &zones{}
		b := "b"
		s.zones.self.Store(&b)
		s.zones.learn(seed, "a")
		s.zones.learn(x, "b")
		s.zones.learn(y, "b")
		return s
	}
	sx, sy := source(x), source(y)
	crossers := 0
	for i := range 20 {
		k := testKeyN(100 + i)
		for _, s := range []*Source{sx, sy} {
			if _, gated := s.zoneGate(k, []peer.AddrInfo{{ID: seed}, {ID: x}, {ID: y}}); gated {
				t.Fatal("gated before any provider was known to hold the blob whole")
			}
			s.markWhole(k)
		}
		lx, gx := sx.zoneGate(k, []peer.AddrInfo{{ID: seed}, {ID: y}})
		ly, gy := sy.zoneGate(k, []peer.AddrInfo{{ID: seed}, {ID: x}})
		if gx == gy {
			t.Fatalf("blob %d: x gated %v, y gated %v: want exactly one crosser", i, gx, gy)
		}
		if gx && (len(lx) != 1 || lx[0].ID != y) || gy && (len(ly) != 1 || ly[0].ID != x) {
			t.Fatalf("blob %d: the gated node asks %v / %v, want only its zone's crosser", i, lx, ly)
		}
		if !gx {
			crossers++
		}
		// The crosser insists: a holder whose turn for the zone went to
		// another node serves it all the same.
		if sx.zoneCrosser(k, []peer.AddrInfo{{ID: seed}, {ID: y}}) == gx || sy.zoneCrosser(k, []peer.AddrInfo{{ID: seed}, {ID: x}}) == gy {
			t.Fatalf("blob %d: the crosser is not the node left ungated", i)
		}
	}
	if crossers == 0 || crossers == 20 {
		t.Fatalf("x crossed for %d of 20 blobs: the crosser should vary by blob", crossers)
	}
}

// With zones, a blob's first fetch finds out alone whether a whole copy
// exists; the read-ahead waits for its answer and then, this node not being
// its zone's crosser, asks only its zone instead of crossing too.
func TestZoneProbeHoldsTheReadAheadUntilTheFirstAnswer(t *testing.T) {
	s, _, g, ids := setup(t, "whole", "notfound")
	seed, y := ids[0], ids[1]
	s.zones = &zones{}
	b := "b"
	s.zones.self.Store(&b)
	s.zones.learn(seed, "a")
	s.zones.learn(y, "b")
	for rank(testKey(), 0, []peer.ID{s.self, y})[0] != y {
		s.self = newPeerID(t) // y is the zone's crosser
	}
	s.SetBusyWait(0) // the waiting read-ahead gives up at once, insisting
	g.hold = make(chan struct{})
	first := make(chan error, 1)
	go func() { _, _, err := readAll(t, s, 0, 1<<20); first <- err }()
	waitFor(t, "the first fetch asks the holder", func() bool {
		for _, c := range g.calls() {
			if c.p == seed {
				return true
			}
		}
		return false
	})
	second := make(chan error, 1)
	go func() { _, _, err := readAll(t, s, 1<<20, 1<<20); second <- err }()
	time.Sleep(50 * time.Millisecond) // the read-ahead waits, asking nobody
	for _, c := range g.calls() {
		if c.off == 1<<20 {
			t.Fatalf("the read-ahead asked %s before the first fetch's answer", c.p)
		}
	}
	close(g.hold)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if err := <-second; err != nil {
		t.Fatal(err)
	}
	for _, c := range g.calls() {
		if c.off == 1<<20 && c.p == seed && !c.insist {
			t.Fatalf("the read-ahead crossed zones without waiting for its zone: %+v", g.calls())
		}
	}
	// Not the zone's designated crosser, the first fetch found out with a
	// one-byte range: its chunk crossed only when it insisted.
	probed := false
	for _, c := range g.calls() {
		switch {
		case c.p != seed:
		case !probed && (c.off != 0 || c.n != 1):
			t.Fatalf("the first request to the holder was %d bytes at %d, want a one-byte probe", c.n, c.off)
		case !probed:
			probed = true
		case !c.insist:
			t.Fatalf("a chunk crossed zones before this node waited for its zone: %d bytes at %d", c.n, c.off)
		}
	}
}

// A transfer that crawls is left for another holder without penalty; when
// the only other holder had sent the fetch to wait for others, it is asked
// again, insisting, and serves the rest.
func TestSlowTransferMovesToTheHolderThatSaidWait(t *testing.T) {
	s, _, g, ids := setup(t, "fanout", "trickle")
	var mu sync.Mutex
	clock := time.Now()
	s.now = func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		clock = clock.Add(100 * time.Millisecond)
		return clock
	}
	b, origin, err := readAll(t, s, 0, 1<<20)
	if err != nil || !bytes.Equal(b, g.data[:1<<20]) {
		t.Fatalf("%d bytes, %v", len(b), err)
	}
	if origin != ids[1].String()+","+ids[0].String() {
		t.Fatalf("origin %q, want the crawling peer then the holder that said wait", origin)
	}
	calls := g.calls()
	if last := calls[len(calls)-1]; last.p != ids[0] || !last.insist || last.off == 0 {
		t.Fatalf("last request %+v, want the rest from the first holder, insisting", last)
	}
	if len(s.order([]peer.AddrInfo{{ID: ids[1]}})) != 1 {
		t.Fatal("the slow peer is avoided")
	}
	if got := testutil.ToFloat64(s.m.peerErrors.WithLabelValues("slow")); got != 1 {
		t.Fatalf("slow transfers counted %v, want 1", got)
	}
}

// A holder that says "wait for others" forever, even to an insisting
// request, is no failure and holds the fetch no longer than the fan-out
// wait: then the answer is an error the cache takes to the origin.
func TestFanoutForeverEndsAtTheOrigin(t *testing.T) {
	s, _, g, ids := setup(t, "fanout-forever")
	var mu sync.Mutex
	clock := time.Now()
	var waited time.Duration
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	s.after = func(d time.Duration) <-chan time.Time {
		mu.Lock()
		defer mu.Unlock()
		clock = clock.Add(d)
		waited += d
		ch := make(chan time.Time, 1)
		ch <- clock
		return ch
	}
	s.SetBusyWait(8 * time.Second)
	_, _, err := readAll(t, s, 0, 1<<20)
	if !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("a holder that never serves: %v, want ErrNotFound (the origin's turn)", err)
	}
	if waited > fanoutWait {
		t.Fatalf("waited %v, want at most the fan-out wait %v", waited, fanoutWait)
	}
	if last := g.calls()[len(g.calls())-1]; !last.insist {
		t.Fatalf("last request %+v, want an insisting one", last)
	}
	if len(s.order([]peer.AddrInfo{{ID: ids[0]}})) != 1 {
		t.Fatal("the holder is avoided for saying busy")
	}
}

// A holder says "wait for others" while the only other holder is slow to
// answer at all: the fetch does not wait on the slow one; it waits its turn
// at the holder and, insisting, reads from it.
func TestFanoutHolderBeatsAProviderSlowToAnswer(t *testing.T) {
	s, _, g, ids := setup(t, "fanout", "slow")
	var mu sync.Mutex
	clock := time.Now()
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	s.after = func(d time.Duration) <-chan time.Time {
		mu.Lock()
		defer mu.Unlock()
		clock = clock.Add(d)
		ch := make(chan time.Time, 1)
		ch <- clock
		return ch
	}
	b, origin, err := readAll(t, s, 0, 1<<20)
	if err != nil || !bytes.Equal(b, g.data[:1<<20]) || origin != ids[0].String() {
		t.Fatalf("%d bytes from %s, %v; want the holder that said wait, not the slow one", len(b), origin, err)
	}
	if g.cancelled.Load() == 0 {
		t.Fatal("the slow provider's request was never given up")
	}
	if len(s.order([]peer.AddrInfo{{ID: ids[1]}})) != 1 {
		t.Fatal("the slow provider is avoided")
	}
}

// The nodes of a zone agree on the crosser of a blob from its first chunk,
// before their provider lists show each other: it is designated among the
// zone members they know. The others wait for it while it is among the
// providers; when it has not shown up crosserGrace after they first asked
// (it may not pull the blob), they choose among the providers they see.
func TestDesignatedCrosserAgreesBeforeTheProvidersShow(t *testing.T) {
	seed, x, y := newPeerID(t), newPeerID(t), newPeerID(t)
	clock := time.Now()
	source := func(self peer.ID) *Source {
		s := newSource(self, &fakeFinder{}, &fakeGetter{}, nil, nil, time.Second, 1)
		s.now = func() time.Time { return clock }
		s.zones = &zones{}
		b := "b"
		s.zones.self.Store(&b)
		s.zones.learn(seed, "a")
		s.zones.learn(x, "b")
		s.zones.learn(y, "b")
		return s
	}
	sx, sy := source(x), source(y)
	onlySeed := []peer.AddrInfo{{ID: seed}}
	for i := range 10 {
		k := testKeyN(200 + i)
		sx.markWhole(k)
		sy.markWhole(k)
		designated, other := sx, sy
		if sx.zones.designated(k, x) != x {
			designated, other = sy, sx
		}
		if _, gated := designated.zoneGate(k, onlySeed); gated || !designated.zoneCrosser(k, onlySeed) {
			t.Fatalf("blob %d: the designated crosser is gated or does not insist", i)
		}
		if l, gated := other.zoneGate(k, onlySeed); !gated || len(l) != 0 {
			t.Fatalf("blob %d: the other node may ask %v (gated %v), want it to wait for its zone", i, l, gated)
		}
		// The designated crosser shows up as a provider: the other waits
		// for it past the grace, asking only it.
		withD := []peer.AddrInfo{{ID: seed}, {ID: designated.self}}
		clock = clock.Add(2 * crosserGrace)
		if l, gated := other.zoneGate(k, withD); !gated || len(l) != 1 || l[0].ID != designated.self {
			t.Fatalf("blob %d: with the crosser among the providers the other asks %v (gated %v)", i, l, gated)
		}
		// It never shows up (a blob it does not pull): past the grace the
		// other chooses among the providers it sees, here only itself.
		k2 := testKeyN(300 + i)
		other.markWhole(k2)
		if other.zones.designated(k2, other.self) == other.self {
			continue
		}
		if _, gated := other.zoneGate(k2, onlySeed); !gated {
			t.Fatalf("blob %d: crossed before the grace for the designated crosser ended", i)
		}
		clock = clock.Add(crosserGrace + time.Millisecond)
		if _, gated := other.zoneGate(k2, onlySeed); gated {
			t.Fatalf("blob %d: still waiting for a designated crosser that is no provider, past the grace", i)
		}
	}
}
