package fusefs

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/transfer"
)

// lazyFile reads through the cache, fetching missing chunks on demand.
type lazyFile struct {
	n      *blobNode
	h      *cache.Handle
	once   sync.Once
	opened time.Time
	failed atomic.Value // string: the last read failure
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
		l.failed.Store(err.Error())
		return nil, syscall.EIO
	}
	n.f.m.readBytes.WithLabelValues("lazy").Add(float64(got))
	n.f.m.readSeconds.Observe(time.Since(start).Seconds())
	return fuse.ReadResultData(dest[:got]), 0
}

func (l *lazyFile) Release(ctx context.Context) syscall.Errno {
	l.once.Do(func() {
		result, _ := l.failed.Load().(string)
		served := l.h.Served()
		var peers []string
		if served.Peers > 0 {
			peers = l.h.Info().Peers
		}
		l.n.record(l.opened, served, peers, result)
		l.h.Close()
		l.n.mu.Lock()
		l.n.lazyOpen--
		l.n.cachedOpen--
		l.n.mu.Unlock()
	})
	return 0
}

// record adds a file's reads, from open to release, to the transfer log.
// A file nobody read is not a transfer.
func (n *blobNode) record(opened time.Time, b transfer.Bytes, peers []string, result string) {
	if b.Total() == 0 && result == "" {
		return
	}
	if result == "" {
		result = "ok"
	}
	n.f.opts.Transfers.Add(transfer.Record{Start: opened, Face: transfer.FaceFUSE, Key: string(n.key),
		Bytes: b, Peers: peers, Duration: time.Since(opened), Result: result})
}

// localFile reads a cached, verified blob from the cache's backing file. The
// LocalReader pins the blob against eviction while the file is open.
type localFile struct {
	n      *blobNode
	lr     *cache.LocalReader
	once   sync.Once
	opened time.Time
	read   atomic.Int64
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
	l.read.Add(int64(got))
	return fuse.ReadResultData(dest[:got]), 0
}

func (l *localFile) Release(ctx context.Context) syscall.Errno {
	l.once.Do(func() {
		l.n.record(l.opened, transfer.Bytes{Cache: l.read.Load()}, nil, "")
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
		// The kernel reads the cache file itself: only reads it declined
		// reach Read and are counted.
		p.n.record(p.opened, transfer.Bytes{Cache: p.read.Load()}, nil, "ok (passthrough: kernel reads not counted)")
		p.lr.Close()
		p.n.mu.Lock()
		p.n.passOpen--
		p.n.mu.Unlock()
	})
	return 0
}
