package cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
)

// backedPeer is a peer source that counts which of its two entry points the
// cache used.
type backedPeer struct {
	*fakeSource
	backed, plain atomic.Int64
}

func (b *backedPeer) Fetch(ctx context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	b.plain.Add(1)
	return b.fakeSource.Fetch(ctx, k, off, n)
}

func (b *backedPeer) FetchShared(ctx context.Context, k blob.Key, off, n int64) (blob.Share, error) {
	b.backed.Add(1)
	rc, size, err := b.fakeSource.Fetch(ctx, k, off, n)
	return blob.Share{Body: rc, Size: size}, err
}

func (b *backedPeer) Yields(blob.Key, int64) bool { return false }

var _ blob.Swarm = (*backedPeer)(nil)

func openNoReadAhead(t *testing.T, l blob.Announcer) *Cache {
	t.Helper()
	c, err := Open(Options{Dir: t.TempDir(), ChunkSize: cs, ReadAhead: -1, Announcer: l, FlushInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestSwarmPullAnnouncedAtOpenAndWithdrawnOnFailure(t *testing.T) {
	rec := &recorder{}
	c := openNoReadAhead(t, rec)
	_, k := randBlob(t, 3*cs)
	peer, origin := newFake("peer", false), newFake("upstream", true)
	h := c.Open(k, Plan{Peers: peer, Origin: origin})
	if !rec.has(false, k) {
		t.Fatal("a pull with an origin behind the peers was not announced when it opened")
	}
	if _, err := h.Size(context.Background()); err == nil {
		t.Fatal("size of a blob nobody has")
	}
	h.Close()
	// The fill's goroutine lets go of the entry just after the reader's error.
	waitFor(t, "the failed pull's withdrawal", func() bool { return rec.has(true, k) })
	// Without an origin behind the peers (a FUSE read), nothing is announced
	// before bytes land.
	_, k2 := randBlob(t, cs)
	h2 := c.Open(k2, Plan{Local: newFake("containerd", true), Peers: peer})
	h2.Close()
	if rec.has(false, k2) {
		t.Fatal("a read without an origin after the peers was announced")
	}
}

func TestFetchSharedOnlyWithAnOriginBehind(t *testing.T) {
	c := openNoReadAhead(t, nil)
	data, k := randBlob(t, 2*cs)
	peer := &backedPeer{fakeSource: newFake("peer", false)}
	peer.blobs[k] = data
	h := c.Open(k, Plan{Peers: peer, Origin: newFake("upstream", true)})
	if got := readAll(t, h); !bytes.Equal(got, data) {
		t.Fatal("bytes differ")
	}
	h.Close()
	if peer.backed.Load() == 0 || peer.plain.Load() != 0 {
		t.Fatalf("with an origin behind: FetchShared %d, Fetch %d", peer.backed.Load(), peer.plain.Load())
	}
	data2, k2 := randBlob(t, 2*cs)
	peer.blobs[k2] = data2
	h = c.Open(k2, Plan{Peers: peer})
	readAll(t, h)
	h.Close()
	if peer.plain.Load() == 0 {
		t.Fatal("without an origin the peer was not asked with Fetch")
	}
}

// readingChunk1 opens a 4-chunk blob the origin holds, behind a peer
// source that holds nothing, and starts this node's own read of chunk 1;
// that fill is held at the origin (atOrigin) or at the peer until gate is
// closed. It returns once the held fetch was asked for.
func readingChunk1(t *testing.T, atOrigin bool) (c *Cache, data []byte, k blob.Key, origin *fakeSource, gate chan struct{}) {
	t.Helper()
	c = openNoReadAhead(t, nil)
	data, k = randBlob(t, 4*cs)
	peer, origin := newFake("peer", false), newFake("upstream", true)
	origin.blobs[k] = data
	held := peer
	if atOrigin {
		held = origin
	}
	gate = make(chan struct{})
	held.block[cs] = gate
	h := c.Open(k, Plan{Peers: peer, Origin: origin})
	t.Cleanup(func() { h.Close() })
	if _, err := h.Size(context.Background()); err != nil {
		t.Fatal(err)
	}
	go h.ReadAt(context.Background(), make([]byte, cs), cs)
	waitFor(t, "the held fetch of chunk 1", func() bool { return held.count(cs) == 1 })
	return c, data, k, origin, gate
}

func TestAwaitLocalWaitsForOwnedChunkInFlight(t *testing.T) {
	// The node's own reader is filling chunk 1, still asking the peers
	// (which may be waiting for the asker).
	c, data, k, origin, gate := readingChunk1(t, false)

	// A peer that asks for a chunk this node does not own is told at once.
	if _, _, err := c.AwaitLocal(context.Background(), k, cs, cs, func(int64) bool { return false }); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("not owned: %v, want ErrNotFound", err)
	}
	// The owner makes the peer wait, then serves the chunk once it landed
	// (from the origin, after the peers said no).
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		lr, _, err := c.AwaitLocal(ctx, k, cs, cs, func(int64) bool { return true })
		if err != nil {
			done <- result{err: err}
			return
		}
		defer lr.Close()
		b, err := io.ReadAll(lr)
		done <- result{b, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("answered before the chunk landed: %v", r.err)
	case <-time.After(50 * time.Millisecond):
	}
	close(gate)
	r := <-done
	if r.err != nil || !bytes.Equal(r.b, data[cs:2*cs]) {
		t.Fatalf("after landing: %v (%d bytes)", r.err, len(r.b))
	}
	if n := origin.count(cs); n != 1 {
		t.Fatalf("origin asked %d times for chunk 1", n)
	}
}

func TestAwaitLocalFetchesOwnedChunkWithThePullsSources(t *testing.T) {
	c := openNoReadAhead(t, nil)
	data, k := randBlob(t, 4*cs)
	peer, origin := newFake("peer", false), newFake("upstream", true)
	origin.blobs[k] = data
	h := c.Open(k, Plan{Peers: peer, Origin: origin})
	if _, err := h.Size(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Nobody holds chunk 2: the owner fetches it from the origin when asked.
	lr, _, err := c.AwaitLocal(ctx, k, 2*cs, cs, func(int64) bool { return true })
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(lr)
	lr.Close()
	if !bytes.Equal(b, data[2*cs:3*cs]) || origin.count(2*cs) != 1 || peer.count(2*cs) != 1 {
		t.Fatalf("owned chunk: right bytes %v, origin asked %d times, peers %d (want 1, 1)", bytes.Equal(b, data[2*cs:3*cs]), origin.count(2*cs), peer.count(2*cs))
	}
	// Once the pull's last handle closed, nothing is fetched for peers.
	h.Close()
	if _, _, err := c.AwaitLocal(ctx, k, 3*cs, cs, func(int64) bool { return true }); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("no pull: %v, want ErrNotFound", err)
	}
	if origin.count(3*cs) != 0 {
		t.Fatal("fetched for a peer with no pull in progress")
	}

	// A blob a peer holds complete: the owner's fill takes the chunk from
	// that peer, not from the origin, and as peer bytes it is not passed on
	// before verification (the asker reads it from the holder too).
	data2, k2 := randBlob(t, 4*cs)
	origin.blobs[k2] = data2
	peer.blobs[k2] = data2
	h2 := c.Open(k2, Plan{Peers: peer, Origin: origin})
	defer h2.Close()
	if _, err := h2.Size(ctx); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.AwaitLocal(ctx, k2, 2*cs, cs, func(int64) bool { return true }); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("chunk from a holder: %v, want ErrNotFound", err)
	}
	if origin.total() != 2 || !c.entryForTest(k2).hasChunk(2) {
		t.Fatalf("origin asked %d times in all (want 2, for blob 1), chunk 2 of blob 2 stored: %v", origin.total(), c.entryForTest(k2).hasChunk(2))
	}
}

func (c *Cache) entryForTest(k blob.Key) *entry {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.blobs[k]
}

func TestAwaitLocalAnyoneWaitsForAFillAtTheOrigin(t *testing.T) {
	c, _, k, origin, gate := readingChunk1(t, true)
	// This node no longer owns chunk 1 (a node joined the burst), but its
	// fill is at the origin: the asker waits rather than fetch it again.
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		lr, _, err := c.AwaitLocal(ctx, k, cs, cs, func(int64) bool { return false })
		if err == nil {
			lr.Close()
		}
		done <- err
	}()
	// The origin's chunk is held until the asker had the time to give up:
	// an answer before it lands is wrong, whatever it says.
	select {
	case err := <-done:
		close(gate)
		t.Fatalf("answered before the chunk at the origin landed: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatalf("waiting for a fill at the origin: %v", err)
	}
	if n := origin.count(cs); n != 1 {
		t.Fatalf("origin asked %d times for chunk 1", n)
	}
}

func TestAwaitLocalOwnerWaitsOnlyBrieflyForItsPeerStage(t *testing.T) {
	// This node's fill of chunk 1 is stuck asking a peer (perhaps the asker,
	// which believes it owns the chunk too): the asker is told "don't have"
	// after peerStageWait, well before its own deadline.
	c, _, k, _, gate := readingChunk1(t, false)
	defer close(gate)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, _, err := c.AwaitLocal(ctx, k, cs, cs, func(int64) bool { return true }); !errors.Is(err, blob.ErrNotFound) || ctx.Err() != nil {
		t.Fatalf("owner with its fill asking peers: %v (deadline passed: %v), want ErrNotFound before the deadline", err, ctx.Err())
	}
}

// notYetPeer answers its first FetchShared with a Share still gathering
// (nobody seen pulling yet), then serves what it holds. released counts the
// calls of that Share's Release.
type notYetPeer struct {
	*fakeSource
	ready    chan struct{}
	yield    bool
	backed   atomic.Int64
	released atomic.Int64
}

func (p *notYetPeer) FetchShared(ctx context.Context, k blob.Key, off, n int64) (blob.Share, error) {
	if p.backed.Add(1) == 1 {
		return blob.Share{Gathering: p.ready, Release: func() { p.released.Add(1) }}, nil
	}
	rc, size, err := p.fakeSource.Fetch(ctx, k, off, n)
	return blob.Share{Body: rc, Size: size}, err
}

func (p *notYetPeer) Yields(blob.Key, int64) bool { return p.yield }

var _ blob.Swarm = (*notYetPeer)(nil)

// speculativePull opens a two-chunk blob whose peer source answers its
// first chunk with a Share still gathering (yielding when told to) and whose origin
// holds it; gate, when not nil, holds the origin's chunk 0 until closed.
// It returns the channel that gets the result of reading chunk 0.
func speculativePull(t *testing.T, yield bool, gate chan struct{}) (*Cache, blob.Key, *notYetPeer, *fakeSource, <-chan error) {
	t.Helper()
	c := openNoReadAhead(t, nil)
	data, k := randBlob(t, 2*cs)
	peer := &notYetPeer{fakeSource: newFake("peer", false), ready: make(chan struct{}), yield: yield}
	peer.blobs[k] = data
	origin := newFake("upstream", true)
	origin.blobs[k] = data
	if gate != nil {
		origin.block[0] = gate
	}
	h := c.Open(k, Plan{Peers: peer, Origin: origin})
	t.Cleanup(func() { h.Close() })
	got := make(chan error, 1)
	go func() {
		buf := make([]byte, cs)
		_, err := h.ReadAt(context.Background(), buf, 0)
		if err == nil && !bytes.Equal(buf, data[:cs]) {
			err = errors.New("bytes differ")
		}
		got <- err
	}()
	return c, k, peer, origin, got
}

func TestSpeculativeFirstChunkYieldsToTheOwner(t *testing.T) {
	// The origin is slower than the gather: its chunk 0 never comes.
	c, k, peer, origin, got := speculativePull(t, true, make(chan struct{}))
	// The origin is asked at once, without waiting for the peer source's answer...
	waitFor(t, "the speculative origin fetch", func() bool { return origin.count(0) == 1 })
	// ...and while the peer source has not decided, askers are not told the
	// fill is at the origin (it may still turn to a peer).
	e := c.entryForTest(k)
	e.mu.Lock()
	call := e.inflight[0]
	e.mu.Unlock()
	if call == nil || call.reachedOrigin() {
		t.Fatal("an undecided speculative fill counts as at the origin")
	}
	// Another node owns the chunk: the origin fetch is abandoned and the
	// chunk read through the peer source.
	close(peer.ready)
	if err := <-got; err != nil {
		t.Fatalf("read: %v", err)
	}
	if n := peer.count(0); n != 1 {
		t.Fatalf("peer served chunk 0 %d times, want 1", n)
	}
	if n := origin.bytes.Load(); n != 0 {
		t.Fatalf("origin sent %d bytes of a yielded chunk", n)
	}
	waitFor(t, "the share's release", func() bool { return peer.released.Load() == 1 })
}

func TestSpeculativeFirstChunkKeptWhenThisNodeOwnsIt(t *testing.T) {
	gate := make(chan struct{})
	c, k, peer, origin, got := speculativePull(t, false, gate)
	waitFor(t, "the speculative origin fetch", func() bool { return origin.count(0) == 1 })
	close(peer.ready) // this node owns the chunk: the fetch goes on
	e := c.entryForTest(k)
	waitFor(t, "the fill to count as at the origin", func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		call := e.inflight[0]
		return call == nil || call.reachedOrigin()
	})
	close(gate)
	if err := <-got; err != nil {
		t.Fatalf("read: %v", err)
	}
	if n := origin.count(0); n != 1 {
		t.Fatalf("origin asked %d times for chunk 0, want 1", n)
	}
	if n := peer.backed.Load(); n != 1 {
		t.Fatalf("peer asked %d times, want once (the chunk stayed with this node)", n)
	}
}

func TestSpeculativeFirstChunkNeedsNoDecisionWhenTheOriginIsFast(t *testing.T) {
	// ready is never closed: a lone cold read finishes from the origin
	// without waiting for the swarm to form.
	_, _, peer, _, got := speculativePull(t, true, nil)
	if err := <-got; err != nil {
		t.Fatalf("read: %v", err)
	}
	if n := peer.count(0); n != 0 {
		t.Fatalf("peer served chunk 0 %d times, want 0 (the origin's copy landed first)", n)
	}
	// The chunk is here: the peer source is told its second look is not
	// needed for it.
	waitFor(t, "the share's release", func() bool { return peer.released.Load() == 1 })
}

func TestSpeculativeFirstChunkTurnsToThePeersWhenTheOriginFails(t *testing.T) {
	// The registry is down and refuses at once, before the peer source can
	// tell who pulls the blob: the chunk comes from the peers once they
	// answer instead of failing (a mirror that fails answers 404, and
	// containerd's next host is that registry).
	c := openNoReadAhead(t, nil)
	data, k := randBlob(t, 2*cs)
	peer := &notYetPeer{fakeSource: newFake("peer", false), ready: make(chan struct{})}
	peer.blobs[k] = data
	origin := newFake("upstream", true)
	origin.blobs[k] = data
	origin.fail = errors.New("connection refused")
	h := c.Open(k, Plan{Peers: peer, Origin: origin})
	defer h.Close()
	got := make(chan error, 1)
	buf := make([]byte, cs)
	go func() {
		_, err := h.ReadAt(context.Background(), buf, 0)
		got <- err
	}()
	waitFor(t, "the origin's refusal", func() bool { return origin.count(0) >= 1 })
	// The fill now waits for the peer source's answer: it must not release
	// the share yet, or the answer it waits for might never be looked up.
	time.Sleep(20 * time.Millisecond)
	if n := peer.released.Load(); n != 0 {
		t.Fatalf("share released %d times while its fill still waits for the gather", n)
	}
	close(peer.ready)
	if err := <-got; err != nil {
		t.Fatalf("read with the origin down and a peer holding the chunk: %v", err)
	}
	if !bytes.Equal(buf, data[:cs]) {
		t.Fatal("bytes differ")
	}
	if n := peer.count(0); n != 1 {
		t.Fatalf("peer served chunk 0 %d times, want 1", n)
	}
}
