package cache

import (
	"context"
	"io"
	"strings"
	"testing"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/transfer"
)

func TestHandleServedCountsBytesBySource(t *testing.T) {
	c := open(t, t.TempDir(), 1<<30, nil, nil) // read-ahead on: chunks land before the reader asks
	defer c.Close()
	data, k := randBlob(t, 5*cs+100)
	size := int64(len(data))
	peer, origin := newFake("peer", false), newFake("upstream", true)
	origin.blobs[k] = data
	// Chunks 0-1 from a peer, the rest from the origin.
	peer.blobs[k] = data
	h := c.Open(k, Plan{Peers: truncating{peer, 2 * cs}, Origin: origin})
	if got := readAll(t, h); len(got) != len(data) {
		t.Fatalf("read %d bytes", len(got))
	}
	got := h.Served()
	h.Close()
	if want := (transfer.Bytes{Peers: 2 * cs, Origin: size - 2*cs}); got != want {
		t.Fatalf("first read served %+v, want %+v", got, want)
	}
	// The same blob again: all from the cache, even with a source behind.
	h2 := c.Open(k, origin.plan())
	var sink strings.Builder
	if _, err := h2.WriteRange(context.Background(), &sink, 10, size-10); err != nil {
		t.Fatal(err)
	}
	if got := h2.Served(); got != (transfer.Bytes{Cache: size - 10}) {
		t.Fatalf("second read served %+v, want %d bytes from the cache", got, size-10)
	}
	h2.Close()
	info, ok := c.Stat(k)
	if !ok || info.Filled != (transfer.Bytes{Peers: 2 * cs, Origin: size - 2*cs}) {
		t.Fatalf("Stat filled %+v", info.Filled)
	}
	waitFor(t, "verification", func() bool { i, _ := c.Stat(k); return i.Verified })
	if m, ok := c.ChunkMap(k); !ok || m != "vvvvvv" {
		t.Fatalf("chunk map %q", m)
	}
}

// truncating is a peer source that holds only the chunks before limit.
type truncating struct {
	*fakeSource
	limit int64
}

func (s truncating) Fetch(ctx context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	if off >= s.limit {
		return nil, -1, blob.ErrNotFound
	}
	return s.fakeSource.Fetch(ctx, k, off, n)
}
