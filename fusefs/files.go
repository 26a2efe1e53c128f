package fusefs

import (
	"context"
	"errors"
	"io"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/peerd-project/peerd/cache"
)

// lazyFile reads through the cache, fetching missing chunks on demand.
type lazyFile struct {
	n    *blobNode
	h    *cache.Handle
	once sync.Once
}

func (l *lazyFile) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	n := l.n
	if off >= n.size {
		return fuse.ReadResultData(nil), 0
	}
	start := time.Now()
	end := off + int64(len(dest))
	timeout := n.f.opts.ReadTimeout
	if n.recentlyTimedOut(off, end) {
		// Serve what is cached by now; do not wait on the missing bytes again.
		timeout = 0
	}
	rctx, cancel := n.f.opCtx(ctx, timeout)
	defer cancel()
	got, err := l.h.ReadAt(rctx, dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		if ctx.Err() != nil && n.f.ctx.Err() == nil {
			// The kernel interrupted the request: the reader is gone.
			return nil, syscall.EINTR
		}
		if n.f.ctx.Err() != nil {
			err = errors.New("blob filesystem is unmounting")
		} else if errors.Is(err, context.DeadlineExceeded) && timeout > 0 {
			n.noteTimeout(off+int64(got), end)
		}
		n.readFailed(off, len(dest), err)
		return nil, syscall.EIO
	}
	n.f.m.readBytes.WithLabelValues("lazy").Add(float64(got))
	n.f.m.readSeconds.Observe(time.Since(start).Seconds())
	return fuse.ReadResultData(dest[:got]), 0
}

func (l *lazyFile) Release(ctx context.Context) syscall.Errno {
	l.once.Do(func() {
		l.h.Close()
		l.n.mu.Lock()
		l.n.lazyOpen--
		l.n.cachedOpen--
		l.n.mu.Unlock()
	})
	return 0
}

// localFile reads a cached, verified blob from the cache's backing file. The
// LocalReader pins the blob against eviction while the file is open.
type localFile struct {
	n    *blobNode
	lr   *cache.LocalReader
	once sync.Once
}

func (l *localFile) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= l.n.size {
		return fuse.ReadResultData(nil), 0
	}
	sz := int(min(int64(len(dest)), l.n.size-off))
	// A plain pread: splicing a full 1 MiB request does not fit the default
	// 1 MiB pipe with the reply header, and the page cache (KEEP_CACHE)
	// serves repeated reads without reaching us anyway.
	got, err := l.lr.File().ReadAt(dest[:sz], off)
	if err != nil && !errors.Is(err, io.EOF) {
		l.n.readFailed(off, sz, err)
		return nil, syscall.EIO
	}
	l.n.f.m.readBytes.WithLabelValues("local").Add(float64(got))
	return fuse.ReadResultData(dest[:got]), 0
}

func (l *localFile) Release(ctx context.Context) syscall.Errno {
	l.once.Do(func() {
		l.lr.Close()
		l.n.mu.Lock()
		l.n.cachedOpen--
		l.n.mu.Unlock()
	})
	return 0
}

// passFile hands the backing file to the kernel (FUSE passthrough): reads
// and mmap go straight to it. Read stays for when the kernel declines.
type passFile struct{ *localFile }

func (p *passFile) PassthroughFd() (int, bool) { return int(p.lr.File().Fd()), true }

func (p *passFile) Release(ctx context.Context) syscall.Errno {
	p.once.Do(func() {
		p.lr.Close()
		p.n.mu.Lock()
		p.n.passOpen--
		p.n.mu.Unlock()
	})
	return 0
}
