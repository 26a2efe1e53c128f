package cache

import (
	"bytes"
	"context"
	"io"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
)

// heldSource sends the first head bytes of every answer at once and the
// rest only when release is closed: a slow origin mid-chunk.
type heldSource struct {
	data    []byte
	head    int
	release chan struct{}
}

var _ blob.Source = (*heldSource)(nil)

func (s *heldSource) Name() string { return "upstream" }

func (s *heldSource) Fetch(ctx context.Context, _ blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	end := min(off+n, int64(len(s.data)))
	body := s.data[off:end]
	h := min(int64(s.head), int64(len(body)))
	return io.NopCloser(io.MultiReader(bytes.NewReader(body[:h]), &gated{ctx: ctx, release: s.release, r: bytes.NewReader(body[h:])})), int64(len(s.data)), nil
}

type gated struct {
	ctx     context.Context
	release chan struct{}
	r       io.Reader
}

func (g *gated) Read(p []byte) (int, error) {
	select {
	case <-g.release:
	case <-g.ctx.Done():
		return 0, g.ctx.Err()
	}
	return g.r.Read(p)
}

// A reader of a blob's first bytes (a header) gets them as they arrive, and
// the size as soon as the source answered, not when the whole first chunk
// is in: a whole chunk from a slow origin costs its transfer time.
func TestReadOfAPrefixDoesNotWaitForTheWholeChunk(t *testing.T) {
	c := Must(Open(Options{Dir: t.TempDir(), ChunkSize: 256 << 10}))
	defer c.Close()
	data, k := randBlob(t, 600<<10+5)
	src := &heldSource{data: data, head: 4096, release: make(chan struct{})}
	h := c.Open(k, Plan{Origin: src})
	defer h.Close()
	// Bounded so that a read waiting for the held rest fails instead of hanging.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	size, err := h.Size(ctx)
	if err != nil || size != int64(len(data)) {
		t.Fatalf("size while the chunk's rest is held: %d, %v", size, err)
	}
	head := make([]byte, 1000)
	if n, err := h.ReadAt(ctx, head, 100); n != len(head) || err != nil || !bytes.Equal(head, data[100:1100]) {
		t.Fatalf("a header read while the chunk's rest is held: %d bytes, %v", n, err)
	}
	if h.Info().Verified {
		t.Fatal("verified before the bytes were in")
	}
	close(src.release)
	got := make([]byte, len(data))
	if n, err := h.ReadAt(context.Background(), got, 0); n != len(data) || (err != nil && err != io.EOF) || !bytes.Equal(got, data) {
		t.Fatalf("the whole blob after the release: %d bytes, %v", n, err)
	}
	waitFor(t, "verification", func() bool { return h.Info().Verified })
}
