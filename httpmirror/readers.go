package httpmirror

import (
	"context"
	"io"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/transfer"
)

// storeReader serves an OCIBlob through serveHandle.
type storeReader struct {
	b       OCIBlob
	written int64
}

func (s *storeReader) Size(context.Context) (int64, error) { return s.b.Size(), nil }
func (s *storeReader) Prefetch(int)                        {}
func (s *storeReader) Served() transfer.Bytes              { return transfer.Bytes{Containerd: s.written} }

// storeReadSize: each ReadAt of containerd's store is one gRPC stream, so
// copy in large pieces and keep the writer's ReadFrom (small reads) out of it.
const storeReadSize = 1 << 20

func (s *storeReader) WriteRange(ctx context.Context, w io.Writer, off, n int64) (int64, error) {
	if n <= 0 {
		return 0, nil // an empty blob (CopyBuffer refuses an empty buffer)
	}
	buf := make([]byte, min(n, storeReadSize))
	m, err := io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{io.NewSectionReader(ctxReaderAt{ctx, s.b}, off, n)}, buf)
	s.written += m
	return m, err
}

// ctxReaderAt stops a copy once the client has gone.
type ctxReaderAt struct {
	ctx context.Context
	r   io.ReaderAt
}

func (c ctxReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.ReadAt(p, off)
}

// cacheLocal serves only what the cache may pass on (local-only requests).
type cacheLocal struct {
	c       *cache.Cache
	k       blob.Key
	size    int64
	written int64
}

func (l *cacheLocal) Size(context.Context) (int64, error) { return l.size, nil }
func (l *cacheLocal) Prefetch(int)                        {}
func (l *cacheLocal) Served() transfer.Bytes              { return transfer.Bytes{Cache: l.written} }
func (l *cacheLocal) WriteRange(ctx context.Context, w io.Writer, off, n int64) (int64, error) {
	lr, _, err := l.c.OpenLocal(l.k, off, n)
	if err != nil {
		return 0, err
	}
	defer lr.Close()
	m, err := io.Copy(w, lr)
	l.written += m
	return m, err
}
