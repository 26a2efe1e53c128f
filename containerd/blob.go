package containerd

// Reading one blob of containerd's content store in place.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/peerd-project/peerd/blob"
)

// Blob is an open blob of containerd's content store.
type Blob struct {
	ra        content.ReaderAt
	cancel    context.CancelFunc
	mediaType string
	once      sync.Once
}

// readTimeout bounds one read from containerd's content store (one gRPC
// stream of at most ReadSize bytes). A containerd that keeps its socket open
// but stops answering (stuck on its disk) must not hold a cache fill, a
// peer's request or a mirror response forever: the blob's reader is then
// cancelled, and this and every later read of it fail.
var readTimeout = 30 * time.Second

// ReadAt reads from containerd's content store.
func (b *Blob) ReadAt(p []byte, off int64) (int, error) {
	var expired atomic.Bool
	t := time.AfterFunc(readTimeout, func() {
		expired.Store(true)
		b.cancel()
	})
	n, err := b.ra.ReadAt(p, off)
	t.Stop()
	if err != nil && expired.Load() {
		err = fmt.Errorf("containerd: read of %d bytes at %d gave nothing in %v: %w", len(p), off, readTimeout, err)
	}
	return n, err
}

// Size is the blob's size.
func (b *Blob) Size() int64 { return b.ra.Size() }

// MediaType is the media type an image descriptor gave the blob, or "".
func (b *Blob) MediaType() string { return b.mediaType }

// Close releases the reader.
func (b *Blob) Close() error {
	var err error
	b.once.Do(func() {
		err = b.ra.Close()
		b.cancel()
	})
	return err
}

// Open opens k in containerd's content store. It answers an error wrapping
// blob.ErrNotFound at once, without asking containerd, for a blob the store
// does not know, and when containerd is unreachable. ctx bounds the open;
// reads run until Close.
func (s *Store) Open(ctx context.Context, k blob.Key) (*Blob, error) {
	if !k.Verifiable() {
		return nil, fmt.Errorf("containerd: %s: %w", k, blob.ErrNotFound)
	}
	d := digest.Digest(k)
	s.mu.RLock()
	be, e := s.be, s.blobs[d]
	var mt string
	if e != nil {
		mt = e.mediaType
	}
	s.mu.RUnlock()
	if be == nil || e == nil {
		return nil, fmt.Errorf("containerd: %s: %w", k, blob.ErrNotFound)
	}
	// The proxy reader keeps the context of ReaderAt for every read: give it
	// one that lives until Close, and cut it only if the open itself runs
	// past its deadline.
	rctx, cancel := context.WithCancel(s.ctx(context.Background()))
	octx, ocancel := context.WithTimeout(ctx, rpcTimeout)
	defer ocancel()
	stop := context.AfterFunc(octx, cancel)
	ra, err := be.Content.ReaderAt(rctx, ocispec.Descriptor{Digest: d, Size: e.size})
	if !stop() && err == nil {
		ra.Close()
		err = octx.Err()
	}
	r := struct {
		ra  content.ReaderAt
		err error
	}{ra, err}
	if r.err != nil {
		cancel()
		if errdefs.IsNotFound(r.err) {
			// containerd dropped it (garbage collection sends no event).
			s.remove(d)
		}
		return nil, fmt.Errorf("containerd: open %s: %v: %w", k, r.err, blob.ErrNotFound)
	}
	return &Blob{ra: r.ra, cancel: cancel, mediaType: mt}, nil
}

// OpenLocal opens bytes [off, off+n) of k from containerd's content store;
// n < 0 means to the end. It also returns the blob's size. The p2p layer
// serves peers with it. A blob containerd does not hold answers an error
// wrapping blob.ErrNotFound quickly.
func (s *Store) OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	b, err := s.Open(ctx, k)
	if err != nil {
		return nil, -1, err
	}
	size := b.Size()
	if n < 0 || n > size-off {
		n = size - off
	}
	if off < 0 || off > size || n < 0 {
		b.Close()
		return nil, size, fmt.Errorf("containerd: range %d+%d outside %d-byte blob %s", off, n, size, k)
	}
	// containerd's gRPC reader opens one stream per ReadAt: read in large
	// pieces whatever buffer size the caller copies with.
	return &readCloser{Reader: bufio.NewReaderSize(io.NewSectionReader(b, off, n), ReadSize), c: b}, size, nil
}

// ReadSize is the unit in which blobs are read from containerd: each read
// is one gRPC stream, so small reads cost dearly.
const ReadSize = 1 << 20

type readCloser struct {
	io.Reader
	c    io.Closer
	stop func() bool // releases a context.AfterFunc; may be nil
}

func (r *readCloser) Close() error {
	if r.stop != nil {
		r.stop()
	}
	return r.c.Close()
}
