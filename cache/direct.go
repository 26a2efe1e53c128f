package cache

import (
	"errors"
	"fmt"
	"io"
	"os"
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
// it; nil when it does not, or when the file system refuses O_DIRECT (the
// cache then stays buffered for every blob). e.mu is held.
func (e *entry) openDirectLocked(path string) *os.File {
	if !e.c.direct.Load() {
		return nil
	}
	df, err := openDirectFile(path)
	if err != nil {
		e.c.noDirect(fmt.Errorf("open %s with O_DIRECT: %w", path, err))
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
	e.mu.Lock()
	n := e.chunkLen(i)
	if h := e.heldLocked(i); h != nil {
		copy(buf, (*h.buf)[:n])
		e.mu.Unlock()
		return n, nil
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
	off := int64(i) * e.c.opts.ChunkSize
	if direct && !isAligned(buf) {
		return 0, errors.New("direct read into an unaligned buffer")
	}
	if _, err := f.ReadAt(buf[:n], off); err != nil && !(errors.Is(err, io.EOF)) {
		return 0, err
	}
	return n, nil
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

// copyChunk writes bytes [from, to) of present chunk i (offsets within the
// chunk) to w, from a held chunk or read with direct I/O into a pooled
// buffer. It is the read path of a blob in direct mode.
func (e *entry) copyChunk(w io.Writer, i int, from, to int64) (int, error) {
	if h := e.refHeld(i); h != nil {
		defer e.unrefHeld(h)
		return w.Write((*h.buf)[from:to])
	}
	bp := chunkBuf(e.c.opts.ChunkSize)
	defer bufPool.Put(bp)
	n, err := e.readChunkInto(i, *bp)
	if err != nil {
		return 0, err
	}
	if to > n {
		return 0, fmt.Errorf("chunk %d has %d bytes, read up to %d", i, n, to)
	}
	return w.Write((*bp)[from:to])
}

// directReader reads a range of a blob in direct mode chunk by chunk
// through copyChunk: what OpenLocal hands out for such a blob.
type directReader struct {
	e        *entry
	pos, end int64
}

func (r *directReader) Read(p []byte) (int, error) {
	if r.pos >= r.end {
		return 0, io.EOF
	}
	cs := r.e.c.opts.ChunkSize
	i := int(r.pos / cs)
	from := r.pos - int64(i)*cs
	to := min(int64(i+1)*cs, r.end) - int64(i)*cs
	to = min(to, from+int64(len(p)))
	n, err := r.e.copyChunk(&sliceWriter{p: p}, i, from, to)
	r.pos += int64(n)
	return n, err
}

// sliceWriter copies what it is given into p.
type sliceWriter struct{ p []byte }

func (w *sliceWriter) Write(b []byte) (int, error) {
	n := copy(w.p, b)
	w.p = w.p[n:]
	return n, nil
}
