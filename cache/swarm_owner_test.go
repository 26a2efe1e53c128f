package cache

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
)

// A node asked for a chunk of its swarm pull that nobody is fetching yet
// starts the fill only when it owns the chunk ("wait for the owner or fetch
// yourself" is the asker's choice, not the asked node's): a non-owner
// answers "don't have" and asks no source for it.
func TestAwaitLocalNonOwnerFetchesNothing(t *testing.T) {
	c := openNoReadAhead(t, nil)
	data, k := randBlob(t, 4*cs)
	peer, origin := newFake("peer", false), newFake("upstream", true)
	origin.blobs[k] = data
	h := c.Open(k, Plan{Peers: peer, Origin: origin})
	defer h.Close()
	if _, err := h.Size(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, _, err := c.AwaitLocal(ctx, k, 2*cs, cs, func(int64) bool { return false }); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("chunk another node owns: %v, want ErrNotFound", err)
	}
	if o, p := origin.count(2*cs), peer.count(2*cs); o != 0 || p != 0 {
		t.Fatalf("a chunk this node does not own was fetched for the asker: origin asked %d times, peers %d (want 0, 0)", o, p)
	}
	if c.entryForTest(k).hasChunk(2) {
		t.Fatal("a chunk this node does not own was stored for the asker")
	}
}

// A node whose fill of a chunk is still asking peers answers a non-owner's
// request at once: only the owner waits (a bounded time) for such a fill,
// since the asker's own fill may be what this one is asking about. The fill
// is let go only after the answer, or, should the node wrongly wait, after
// a while; a node that waited then serves the landed chunk instead of
// answering "don't have".
func TestAwaitLocalNonOwnerDoesNotWaitForAFillAskingPeers(t *testing.T) {
	c, _, k, _, gate := readingChunk1(t, false)
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
	var err error
	answered := false
	select {
	case err = <-done:
		answered = true
	case <-time.After(time.Second): // well under peerStageWait
	}
	close(gate)
	if !answered {
		err = <-done
	}
	if !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("non-owner asked while its fill asks peers: %v, want ErrNotFound at once", err)
	}
}
