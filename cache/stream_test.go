package cache

import (
	"bytes"
	"context"
	"io"
	"sync"
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

// firstBytesWriter hands what it holds at its first flush to got.
type firstBytesWriter struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	got     chan []byte
	flushed bool
}

func (w *firstBytesWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func (w *firstBytesWriter) Flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.flushed && w.buf.Len() > 0 {
		w.flushed = true
		w.got <- bytes.Clone(w.buf.Bytes())
	}
}

var _ flusher = (*firstBytesWriter)(nil)

// A client streaming a cold blob (WriteRange, the HTTP faces) gets its first
// bytes as they arrive and flushed, not when the whole chunk is in and
// stored; the stream it gets is the blob, byte for byte.
func TestWriteRangeStreamsAChunkAsItArrives(t *testing.T) {
	for _, tc := range []struct {
		name    string
		off, n  int64
		headLen int
	}{
		{"from the start", 0, 600<<10 + 5, 4096},
		{"a range inside the first chunk", 1000, 100 << 10, 4096},
		{"a range starting past what arrived", 8000, 300 << 10, 4096},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Must(Open(Options{Dir: t.TempDir(), ChunkSize: 256 << 10}))
			defer c.Close()
			data, k := randBlob(t, 600<<10+5)
			src := &heldSource{data: data, head: tc.headLen, release: make(chan struct{})}
			h := c.Open(k, Plan{Origin: src})
			defer h.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			w := &firstBytesWriter{got: make(chan []byte, 1)}
			done := make(chan error, 1)
			go func() {
				n, err := h.WriteRange(ctx, w, tc.off, tc.n)
				if err == nil && n != tc.n {
					err = io.ErrShortWrite
				}
				done <- err
			}()
			if tc.off < int64(tc.headLen) {
				select {
				case first := <-w.got:
					if want := data[tc.off:min(int64(tc.headLen), tc.off+int64(len(first)))]; !bytes.Equal(first, want) {
						t.Fatalf("first bytes %d, want the %d that had arrived", len(first), len(want))
					}
				case err := <-done:
					t.Fatalf("WriteRange ended (%v) while the chunk's rest was held", err)
				case <-ctx.Done():
					t.Fatal("no byte flushed while the chunk's rest was held: the client waited for the whole chunk")
				}
			}
			close(src.release)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(w.buf.Bytes(), data[tc.off:tc.off+tc.n]) {
				t.Fatalf("streamed %d bytes that differ from the blob's [%d, %d)", w.buf.Len(), tc.off, tc.off+tc.n)
			}
			waitFor(t, "verification", func() bool { return h.Info().Verified })
		})
	}
}
