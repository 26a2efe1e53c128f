package p2p

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestRendezvousIsStableAndSpread(t *testing.T) {
	k := testKey()
	ids := make([]peer.ID, 8)
	for i := range ids {
		ids[i] = newPeerID(t)
	}
	owned := map[peer.ID]int{}
	const chunks = 800
	for c := int64(0); c < chunks; c++ {
		off := c << 20
		a := rank(k, off, ids)
		// The order of the input never matters: every node computes the same owner.
		rev := make([]peer.ID, len(ids))
		for i, id := range ids {
			rev[len(ids)-1-i] = id
		}
		if b := rank(k, off, rev); a[0] != b[0] {
			t.Fatalf("chunk %d: owner depends on list order", c)
		}
		owned[a[0]]++
		// Removing a node that does not own the chunk keeps its owner.
		var without []peer.ID
		for _, id := range ids {
			if id != a[len(a)-1] {
				without = append(without, id)
			}
		}
		if rank(k, off, without)[0] != a[0] {
			t.Fatalf("chunk %d: owner moved when a non-owner left", c)
		}
	}
	for _, id := range ids {
		// 100 expected each; far outside this range means the hash is not spreading.
		if n := owned[id]; n < 50 || n > 160 {
			t.Fatalf("peer owns %d of %d chunks: %v", n, chunks, owned)
		}
	}
}

func swarmFixture(t *testing.T, n int) (*Source, []peer.AddrInfo, *fakeGetter) {
	self := newPeerID(t)
	var ps []peer.AddrInfo
	for i := 0; i < n; i++ {
		ps = append(ps, peer.AddrInfo{ID: newPeerID(t)})
	}
	g := &fakeGetter{data: make([]byte, 64<<20), behave: map[peer.ID]string{}}
	s := newSource(self, &fakeFinder{peers: ps}, g, nil, nil, 0, 0)
	s.timeout = 100 * time.Millisecond
	return s, ps, g
}

func TestFetchSharedAsksTheOwnerFirst(t *testing.T) {
	s, ps, g := swarmFixture(t, 5)
	k := testKey()
	asked := 0
	for c := int64(0); c < 64; c++ {
		off := c << 20
		own := s.owner(k, off, ps)
		if own == s.self {
			continue
		}
		before := len(g.calls())
		rc, _, err := fetchShared(s, k, off)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, rc)
		rc.Close()
		calls := g.calls()[before:]
		if len(calls) == 0 || calls[0].p != own {
			t.Fatalf("chunk %d: first asked %v, owner %s", c, calls, own)
		}
		asked++
	}
	if asked == 0 {
		t.Fatal("self owned every chunk: the test proved nothing")
	}
}

func TestFetchSharedOwnChunkGoesToOriginUnlessAPeerHoldsIt(t *testing.T) {
	s, ps, g := swarmFixture(t, 3)
	k := testKey()
	off := chunkOwnedAmong(t, s, k, ps, s.self)
	// Cold: nobody holds it, everybody says so at once.
	for _, p := range ps {
		g.behave[p.ID] = "notfound"
	}
	if _, _, err := fetchShared(s, k, off); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("cold own chunk: %v, want ErrNotFound (the origin fills it)", err)
	}
	// A peer that has the blob complete still serves our own chunks.
	g.behave[ps[1].ID] = "ok"
	rc, _, err := fetchShared(s, k, off)
	if err != nil {
		t.Fatalf("own chunk held by a peer: %v", err)
	}
	rc.Close()
}

func TestOwnsUsesTheCachedListAndNeverLooksUp(t *testing.T) {
	s, ps, g := swarmFixture(t, 4)
	f := s.finder.(*fakeFinder)
	k := testKey()
	// No list yet: "only me" (the asker named this node), and no lookup.
	if !s.Owns(k, 0) || f.calls.Load() != 0 {
		t.Fatalf("no list: Owns=%v, lookups %d", s.Owns(k, 0), f.calls.Load())
	}
	// Once the node's own pull looked the providers up, Owns agrees with the
	// owner the askers compute.
	for _, p := range ps {
		g.behave[p.ID] = "notfound"
	}
	fetchShared(s, k, 0)
	calls := f.calls.Load()
	mine, theirs := 0, 0
	for c := int64(0); c < 64; c++ {
		if got, want := s.Owns(k, c<<20), s.owner(k, c<<20, ps) == s.self; got != want {
			t.Fatalf("chunk %d: Owns %v, owner is self: %v", c, got, want)
		} else if got {
			mine++
		} else {
			theirs++
		}
	}
	if mine == 0 || theirs == 0 {
		t.Fatalf("owns %d, others own %d of 64 chunks: the check proved nothing", mine, theirs)
	}
	if f.calls.Load() != calls {
		t.Fatal("Owns started a lookup")
	}
}

func TestColdSwarmPullFirstChunkGoesToOriginAtOnceTheRestWaitForTheGather(t *testing.T) {
	s, _, g := swarmFixture(t, 0)
	f := s.finder.(*fakeFinder)
	windowEnd := windowByHand(s) // closing it ends the gather window
	k := testKey()
	// Nobody advertises the blob yet: the chunk the reader waits for goes to
	// the origin without waiting for the gather window.
	if sh, err := s.FetchShared(context.Background(), k, 0, 1<<20); err != nil || sh.Body != nil || sh.Gathering == nil {
		t.Fatalf("first chunk of a cold pull: %+v, %v; want a Share still gathering (the origin fills it)", sh, err)
	}
	if n := f.calls.Load(); n != 1 {
		t.Fatalf("%d lookups for the first chunk, want 1", n)
	}
	// A node that started at the same moment announces during the window.
	other := peer.AddrInfo{ID: newPeerID(t)}
	g.behave[other.ID] = "ok"
	f.mu.Lock()
	f.peers = []peer.AddrInfo{other}
	f.mu.Unlock()
	// The read-ahead chunks wait for the second lookup and then see it.
	off := chunkOwnedBy(t, s, k, 1, other)
	got := fetchBackedAsync(s, k, off)
	select {
	case err := <-got:
		t.Fatalf("a read-ahead chunk did not wait for the gather: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(windowEnd) // what the timer does after s.gather
	if err := <-got; err != nil {
		t.Fatalf("chunk owned by the node that joined in the window: %v", err)
	}
	if calls := g.calls(); len(calls) == 0 || calls[0].p != other.ID {
		t.Fatalf("asked %v, want the owner %s first", calls, other.ID)
	}
}

// The gather window's second lookup is made only for chunks that wait for
// it: a speculative first chunk that arrived (and released its share) with
// nothing else waiting costs the DHT one walk, not two; one still in flight
// keeps the second lookup (it may yet yield to an owner).
func TestGatherLookupIsSkippedWhenNoChunkWaitsForIt(t *testing.T) {
	s, _, _ := swarmFixture(t, 0)
	f := s.finder.(*fakeFinder)
	windowEnd := windowByHand(s)
	done, inFlight := testKeyN(1), testKeyN(2)
	var shares []blob.Share
	for _, k := range []blob.Key{done, inFlight} {
		sh, err := s.FetchShared(context.Background(), k, 0, 1<<20)
		if err != nil || sh.Gathering == nil || sh.Release == nil {
			t.Fatalf("%s: first chunk of a cold pull: %+v, %v; want a Share still gathering, with Release", k, sh, err)
		}
		shares = append(shares, sh)
	}
	waitForCalls(t, f, 2)
	shares[0].Release() // its chunk arrived from the origin
	shares[0].Release() // a second call changes nothing
	close(windowEnd)
	for i, sh := range shares {
		select {
		case <-sh.Gathering:
		case <-time.After(10 * time.Second):
			t.Fatalf("share %d: the gather window never ended", i)
		}
	}
	if n := f.calls.Load(); n != 3 {
		t.Fatalf("%d lookups; want 3: one each first, a second only for the chunk still in flight", n)
	}
	shares[1].Release()
	if got := testutil.ToFloat64(s.m.lookupCache.WithLabelValues("gather_skipped")); got != 1 {
		t.Fatalf("gather_skipped %v, want 1", got)
	}
}

// The gather window's second lookup adds the nodes that started with this
// one and keeps those the first lookup found, even when its own answer is
// partial: a holder dropped from the list would leave the chunks this node
// then owns to the origin.
func TestGatherLookupKeepsTheProvidersTheFirstFound(t *testing.T) {
	s, _, g := swarmFixture(t, 0)
	f := s.finder.(*fakeFinder)
	windowEnd := windowByHand(s) // closing it ends the gather window
	k := testKey()
	holder := peer.AddrInfo{ID: newPeerID(t)}  // holds the whole blob
	partner := peer.AddrInfo{ID: newPeerID(t)} // started with us, holds nothing yet
	g.behave[holder.ID] = "ok"
	g.behave[partner.ID] = "notfound"
	f.peers = []peer.AddrInfo{holder}
	// A chunk this node owns once the partner is known: asked of the
	// providers, only the holder has it.
	off := chunkOwnedAmong(t, s, k, []peer.AddrInfo{holder, partner}, s.self)
	got := fetchBackedAsync(s, k, off)
	waitForCalls(t, f, 1)
	// The second lookup's answer names only the partner.
	f.mu.Lock()
	f.peers = []peer.AddrInfo{partner}
	f.mu.Unlock()
	close(windowEnd)
	if err := <-got; err != nil {
		t.Fatalf("chunk this node owns, with the holder found by the first lookup: %v", err)
	}
	if calls := g.calls(); !slices.ContainsFunc(calls, func(c call) bool { return c.p == holder.ID }) {
		t.Fatalf("asked %v, never the holder", calls)
	}
}

func TestSwarmPullSplitsItsChunksOverTheNodesThatStartedWithIt(t *testing.T) {
	s, ps, g := swarmFixture(t, 1)
	f := s.finder.(*fakeFinder)
	windowEnd := windowByHand(s) // closing it ends the gather window
	k := testKey()
	early := ps[0] // started a moment before us: the first lookup sees it
	g.behave[early.ID] = "ok"
	late := peer.AddrInfo{ID: newPeerID(t)}
	g.behave[late.ID] = "ok"
	all := []peer.AddrInfo{early, late}
	var off int64 = -1
	for c := int64(0); c < 256; c++ {
		if s.owner(k, c<<20, all) == late.ID && s.owner(k, c<<20, ps) != early.ID {
			off = c << 20 // ours by the first answer, the late node's in truth
			break
		}
	}
	// Even the reader's chunk waits: the blob is being pulled already, and
	// the split needs the nodes that start with us.
	got := fetchBackedAsync(s, k, off)
	waitForCalls(t, f, 1)
	// A node starting at the same moment as us announces in the window.
	f.mu.Lock()
	f.peers = append(f.peers, late)
	f.mu.Unlock()
	select {
	case err := <-got:
		t.Fatalf("a chunk was split before the window ended: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(windowEnd)
	if err := <-got; err != nil {
		t.Fatalf("chunk owned by the late node: %v", err)
	}
	if calls := g.calls(); len(calls) == 0 || calls[0].p != late.ID {
		t.Fatalf("asked %v, want the late node (its owner) first", calls)
	}
}

// chunkOwnedBy returns the offset of the first 1 MiB chunk from chunk
// index from on that other owns among this node and other.
func chunkOwnedBy(t *testing.T, s *Source, k blob.Key, from int64, other peer.AddrInfo) int64 {
	t.Helper()
	for c := from; c < 256; c++ {
		if s.owner(k, c<<20, []peer.AddrInfo{other}) == other.ID {
			return c << 20
		}
	}
	t.Fatal("no chunk owned by the other node")
	return -1
}

// windowByHand makes s's gather windows end when the returned channel is
// closed instead of after s.gather.
func windowByHand(s *Source) chan time.Time {
	end := make(chan time.Time)
	s.after = func(time.Duration) <-chan time.Time { return end }
	return end
}

// chunkOwnedAmong returns the offset of the first 1 MiB chunk of k that
// who owns among ps (and this node).
func chunkOwnedAmong(t *testing.T, s *Source, k blob.Key, ps []peer.AddrInfo, who peer.ID) int64 {
	t.Helper()
	for c := int64(0); c < 256; c++ {
		if s.owner(k, c<<20, ps) == who {
			return c << 20
		}
	}
	t.Fatalf("%s owns none of 256 chunks", who)
	return -1
}

// fetchBackedAsync runs FetchShared of the 1 MiB chunk at off and sends its
// error when it returns.
func fetchBackedAsync(s *Source, k blob.Key, off int64) <-chan error {
	got := make(chan error, 1)
	go func() {
		rc, _, err := fetchShared(s, k, off)
		if err == nil {
			rc.Close()
		}
		got <- err
	}()
	return got
}

func waitForCalls(t *testing.T, f *fakeFinder, n int32) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for f.calls.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d lookups, want %d", f.calls.Load(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// With a longer miss hedge (--miss-hedge) the first chunk waits for a slow
// first lookup, and comes from the peer it finds instead of the origin.
func TestLongMissHedgeWaitsForASlowLookup(t *testing.T) {
	s, _, g := swarmFixture(t, 0)
	s.timeout = time.Hour
	s.SetMissHedge(time.Hour)
	f := s.finder.(*fakeFinder)
	windowEnd := windowByHand(s) // closing it ends the gather window
	release := make(chan struct{})
	holder := peer.AddrInfo{ID: newPeerID(t)}
	g.behave[holder.ID] = "ok"
	f.peers, f.block = []peer.AddrInfo{holder}, release // the lookup finds the holder when released
	k := testKey()
	done := fetchBackedAsync(s, k, 0)
	// Twenty default hedges later the chunk still waits for the lookup.
	select {
	case err := <-done:
		close(release)
		t.Fatalf("the first chunk went ahead of the lookup (err %v) with a 1h hedge", err)
	case <-time.After(20 * defaultMissHedge):
	}
	close(release)
	close(windowEnd)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("first chunk after the lookup found a holder: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("the first chunk never answered")
	}
	if calls := g.calls(); len(calls) != 1 || calls[0].p != holder.ID {
		t.Fatalf("peer reads %+v, want one from the holder", calls)
	}
	if got := testutil.ToFloat64(s.m.lookupCache.WithLabelValues("hedged")); got != 0 {
		t.Fatalf("hedged lookups %v, want 0", got)
	}
}

// A first lookup slower than the miss hedge does not hold the cold pull's first
// chunk: it starts from the origin while the lookup runs, and is left to
// its owner when the lookup and the window show one.
func TestSlowFirstSwarmLookupDoesNotHoldTheFirstChunk(t *testing.T) {
	s, _, g := swarmFixture(t, 0)
	f := s.finder.(*fakeFinder)
	windowEnd := windowByHand(s) // closing it ends the gather window
	release := make(chan struct{})
	f.block = release // the DHT is slow: the lookup answers only when released
	k := testKey()
	other := peer.AddrInfo{ID: newPeerID(t)}
	g.behave[other.ID] = "ok"
	off := chunkOwnedBy(t, s, k, 0, other)
	done := make(chan shareResult, 1)
	go func() {
		sh, err := s.FetchShared(context.Background(), k, off, 1<<20)
		done <- shareResult{sh, err}
	}()
	var got shareResult
	select {
	case got = <-done:
	case <-time.After(time.Minute):
		close(release)
		t.Fatal("the first chunk waited for the blocked lookup")
	}
	if got.err != nil || got.sh.Body != nil || got.sh.Gathering == nil {
		t.Fatalf("first chunk while the lookup runs: %+v, want a Share still gathering (the origin fills it now)", got)
	}
	if got := testutil.ToFloat64(s.m.lookupCache.WithLabelValues("hedged")); got != 1 {
		t.Fatalf("hedged lookups %v, want 1", got)
	}
	// The lookup answers: another node pulls the blob and owns the chunk.
	f.mu.Lock()
	f.peers = []peer.AddrInfo{other}
	f.block = nil
	f.mu.Unlock()
	close(release)
	close(windowEnd)
	select {
	case <-got.sh.Gathering:
	case <-time.After(time.Minute):
		t.Fatal("the window never answered")
	}
	if !s.Yields(k, off) {
		t.Fatal("the speculative chunk was kept though another node owns it")
	}
}

type shareResult struct {
	sh  blob.Share
	err error
}

// fetchShared is FetchShared of the 1 MiB chunk at off as a reader: a Share
// still gathering is an error here (the tests that use it expect none).
func fetchShared(s *Source, k blob.Key, off int64) (io.ReadCloser, int64, error) {
	sh, err := s.FetchShared(context.Background(), k, off, 1<<20)
	if err != nil {
		return nil, -1, err
	}
	if sh.Body == nil {
		return nil, -1, fmt.Errorf("%s at %d: a share still gathering", k, off)
	}
	return sh.Body, sh.Size, nil
}

// A blob named by an image manifest that came from a peer (ExpectHeld): its
// first chunk waits for a slow first lookup, past --miss-hedge, and goes to
// the holder the lookup finds instead of the origin. Another blob's first
// chunk does not wait.
func TestExpectedBlobWaitsForItsFirstLookup(t *testing.T) {
	for _, expected := range []bool{true, false} {
		t.Run(fmt.Sprintf("expected=%v", expected), func(t *testing.T) {
			s, _, g := swarmFixture(t, 0)
			s.SetMissHedge(time.Millisecond)
			f := s.finder.(*fakeFinder)
			windowEnd := windowByHand(s)
			release := make(chan struct{})
			holder := peer.AddrInfo{ID: newPeerID(t)}
			g.behave[holder.ID] = "ok"
			f.mu.Lock()
			f.peers = []peer.AddrInfo{holder}
			f.block = release // answers 50 ms in: well past --miss-hedge
			f.mu.Unlock()
			k := testKey()
			if expected {
				s.ExpectHeld([]blob.Key{k})
			}
			go func() { time.Sleep(50 * time.Millisecond); close(release); close(windowEnd) }()
			sh, err := s.FetchShared(context.Background(), k, 0, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			if sh.Body != nil {
				sh.Body.Close()
			}
			hedged := testutil.ToFloat64(s.m.lookupCache.WithLabelValues("hedged"))
			if expected && (hedged != 0 || sh.Body == nil) {
				t.Fatalf("expected blob: hedged lookups %v, body %v; want the holder's bytes after the lookup", hedged, sh.Body != nil)
			}
			if !expected && (hedged != 1 || sh.Gathering == nil) {
				t.Fatalf("other blob: hedged lookups %v; want the first chunk to go ahead (a Share still gathering)", hedged)
			}
		})
	}
}
