package cache

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// A blob the cache fills from nothing is written around the page cache
// (O_DIRECT) until it verifies: the node's memory then holds what workloads
// read, not a second copy of every layer containerd keeps anyway, and the
// cache pays a DMA instead of a copy into new page-cache pages for each
// chunk. The fill's own chunk buffers stay in memory for a while (held
// chunks, below), so the reader that asked for the blob and its hash read
// the chunks from there, not from the disk.
//
// Mixing buffered and direct I/O on one range is the hazard: a page the
// page cache read before a direct write covered it can survive the write
// and serve the old bytes. So while a blob is in direct mode every read of
// its data file is direct too (or comes from a held chunk), and a blob
// leaves direct mode for good when it verifies (no chunk is written after
// that). Blobs loaded at start, and the last chunk of a blob when its length
// is not a multiple of directAlign, use buffered I/O as before.

// directAlign is the alignment O_DIRECT needs of offsets, lengths and
// buffers; 4096 covers every common logical block size.
const directAlign = 4096

// alignedBuf returns a zeroed buffer of n bytes whose start is aligned to
// directAlign.
func alignedBuf(n int64) []byte {
	b := make([]byte, n+directAlign)
	skip := int((directAlign - uintptr(unsafe.Pointer(&b[0]))%directAlign) % directAlign)
	return b[skip : skip+int(n) : skip+int(n)]
}

func isAligned(p []byte) bool {
	return len(p) > 0 && uintptr(unsafe.Pointer(&p[0]))%directAlign == 0
}

// openDirectLocked opens the data file for direct I/O when the cache uses
// it; nil when it does not. A file system that refuses O_DIRECT (EINVAL)
// turns it off for every blob; any other failure (out of descriptors, say)
// leaves this blob buffered only. e.mu is held.
func (e *entry) openDirectLocked(path string) *os.File {
	if !e.c.direct.Load() {
		return nil
	}
	df, err := openDirectFile(path)
	if errors.Is(err, syscall.EINVAL) {
		e.c.noDirect(fmt.Errorf("open %s with O_DIRECT: %w", path, err))
		return nil
	}
	if err != nil {
		e.c.log.Warn("blob written through the page cache: cannot open it for direct I/O", "key", e.key, "err", err)
		return nil
	}
	return df
}

// openDirectFile opens a data file for direct I/O (a variable so tests can
// play a file system that refuses it).
var openDirectFile = func(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_RDWR|syscall.O_DIRECT, 0)
}

// noDirect turns direct I/O off for the whole cache, once, saying why.
func (c *Cache) noDirect(why error) {
	if c.direct.Swap(false) {
		c.log.Info("cache writes go through the page cache: this file system refuses direct I/O", "err", why)
	}
}

// directChunk reports whether chunk i of a blob in direct mode is written
// and read with direct I/O: every chunk whose length is a multiple of
// directAlign (chunk offsets are, by Open's choice of the mode). e.mu is held.
func (e *entry) directChunkLocked(i int) bool {
	return e.directMode && e.df != nil && e.chunkLen(i)%directAlign == 0
}

// readChunkInto reads the whole of present chunk i into buf (its length
// must be at least the chunk's): from a held chunk when there is one, with
// direct I/O when the blob is in direct mode, else from the page cache. It
// returns the chunk's length.
func (e *entry) readChunkInto(i int, buf []byte) (int64, error) {
	n, err := e.readSpan(i, 0, -1, buf)
	return n, err
}

// readSpan reads bytes [from, to) of present chunk i (offsets within the
// chunk; to < 0: its end) into buf[from-start:], where start is from
// rounded down to directAlign, and returns to. It reads from a held copy
// when there is one, with one direct read of the aligned span when the
// blob is in direct mode (buf must be aligned and hold the span), else from
// the page cache.
func (e *entry) readSpan(i int, from, to int64, buf []byte) (int64, error) {
	e.mu.Lock()
	n := e.chunkLen(i)
	if to < 0 || to > n {
		to = n
	}
	start := from &^ (directAlign - 1)
	if h := e.heldLocked(i); h != nil {
		copy(buf[from-start:], (*h.buf)[from:to])
		e.mu.Unlock()
		return to, nil
	}
	direct := e.directChunkLocked(i)
	f := e.df
	if !direct {
		var err error
		if f, err = e.filesLocked(); err != nil {
			e.mu.Unlock()
			return 0, err
		}
	}
	e.mu.Unlock()
	base := int64(i) * e.c.opts.ChunkSize
	if !direct {
		_, err := f.ReadAt(buf[from-start:to-start], base+from)
		return to, err
	}
	end := min((to+directAlign-1)&^(directAlign-1), n)
	if !isAligned(buf) || int64(len(buf)) < end-start {
		return 0, errors.New("direct read into an unaligned or short buffer")
	}
	if _, err := f.ReadAt(buf[:end-start], base+start); err != nil {
		return 0, err
	}
	return to, nil
}

// directSpan bounds one direct read of a blob in direct mode that has no
// held copy: a reader holds one such buffer, so many concurrent readers
// (peers served while the blob fills) cost little memory.
const directSpan = 128 << 10

var spanPool = sync.Pool{New: func() any { b := alignedBuf(directSpan); return &b }}

// nextSpan returns the end of the piece of [from, to) one direct read
// covers: it starts at from rounded down to directAlign and holds at most
// directSpan bytes.
func nextSpan(from, to int64) int64 {
	return min(to, from&^(directAlign-1)+directSpan)
}

// copyChunk writes bytes [from, to) of present chunk i (offsets within the
// chunk) to w, from a held chunk or read with direct I/O a span at a time.
// It is the read path of a blob in direct mode.
func (e *entry) copyChunk(w io.Writer, i int, from, to int64) (int, error) {
	if h := e.refHeld(i); h != nil {
		defer e.unrefHeld(h)
		return w.Write((*h.buf)[from:to])
	}
	bp := spanPool.Get().(*[]byte)
	defer spanPool.Put(bp)
	written := 0
	for from < to {
		end := nextSpan(from, to)
		if _, err := e.readSpan(i, from, end, *bp); err != nil {
			return written, err
		}
		start := from &^ (directAlign - 1)
		n, err := w.Write((*bp)[from-start : end-start])
		written += n
		if err != nil {
			return written, err
		}
		from = end
	}
	return written, nil
}

// directReader reads a range of a blob in direct mode: what OpenLocal hands
// out for such a blob. It reads a span at a time (from the chunk's held
// copy, else with one direct read) and serves the caller's reads from
// there, however small they are.
type directReader struct {
	e        *entry
	pos, end int64
	bp       *[]byte // pooled span buffer holding buf
	buf      []byte  // bytes at [pos, pos+len(buf)) of the blob
}

func (r *directReader) Read(p []byte) (int, error) {
	if r.pos >= r.end {
		return 0, io.EOF
	}
	if len(r.buf) == 0 {
		cs := r.e.c.opts.ChunkSize
		i := int(r.pos / cs)
		from := r.pos - int64(i)*cs
		to := nextSpan(from, min(int64(i+1)*cs, r.end)-int64(i)*cs)
		if r.bp == nil {
			r.bp = spanPool.Get().(*[]byte)
		}
		if _, err := r.e.readSpan(i, from, to, *r.bp); err != nil {
			return 0, err
		}
		start := from &^ (directAlign - 1)
		r.buf = (*r.bp)[from-start : to-start]
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	r.pos += int64(n)
	return n, nil
}

// Close gives the reader's buffer back.
func (r *directReader) Close() {
	if r.bp != nil {
		spanPool.Put(r.bp)
		r.bp, r.buf = nil, nil
	}
}

// leaveDirect switches the blob to buffered I/O for good (direct I/O was
// refused): its pages were never cached, so buffered reads from now on
// cannot see stale ones.
func (e *entry) leaveDirect() {
	e.mu.Lock()
	e.directMode = false
	e.mu.Unlock()
}

// fromMemoryOrDirect reports whether chunk i is read through copyChunk:
// it has a held copy, or the blob is in direct mode.
func (e *entry) fromMemoryOrDirect(i int) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.heldLocked(i) != nil || e.directChunkLocked(i)
}

// directRead reports whether reads of chunk i must not go through the page
// cache (the blob is in direct mode and the chunk is written directly).
func (e *entry) directRead(i int) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.directChunkLocked(i)
}

// sliceWriter copies what it is given into p.
type sliceWriter struct{ p []byte }

func (w *sliceWriter) Write(b []byte) (int, error) {
	n := copy(w.p, b)
	w.p = w.p[n:]
	return n, nil
}
