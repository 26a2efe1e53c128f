package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/transfer"
)

// Handle reads one blob through the cache. Holding a handle pins the blob:
// it is never evicted while open. Close it when done.
type Handle struct {
	c    *Cache
	e    *entry
	plan Plan
	pull bool // counted in e.pulls
	once sync.Once
	// openSeq is the entry's fillSeq at open: chunks landed after it were
	// fetched during this handle's life, the others were in the cache.
	openSeq uint64
	mu      sync.Mutex
	served  transfer.Bytes
}

// Open returns a handle on k whose missing chunks are filled under plan p.
// Opening costs no I/O; the size is learned on first use.
func (c *Cache) Open(k blob.Key, p Plan) *Handle {
	h := &Handle{c: c, e: c.getEntry(k), plan: p}
	h.e.mu.Lock()
	h.openSeq = h.e.fillSeq
	h.e.mu.Unlock()
	h.pull = h.e.startPull(p)
	return h
}

// Close releases the handle.
func (h *Handle) Close() error {
	h.once.Do(func() {
		if h.pull {
			h.e.endPull()
		}
		h.c.unref(h.e)
	})
	return nil
}

// Key is the blob's key.
func (h *Handle) Key() blob.Key { return h.e.key }

// Info reports what the cache holds of the blob.
func (h *Handle) Info() Info { return h.e.info() }

// Size returns the blob's size, asking the sources (and filling the first
// chunk on the way) if the cache does not know it yet.
func (h *Handle) Size(ctx context.Context) (int64, error) {
	h.e.mu.Lock()
	size := h.e.size
	h.e.mu.Unlock()
	if size >= 0 {
		return size, nil
	}
	// Learning the size fills chunk 0 and nothing more: a HEAD or a stat
	// must not start the read-ahead (whether it did depended on which of
	// the caller and the fill got to the entry first). A read of the blob
	// starts it with its own chunk. The size is known once the source
	// answered, before the chunk's bytes arrived: no need to wait for them.
	call, err := h.e.begin(0, h.plan, true)
	if err != nil {
		return -1, err
	}
	if call != nil {
		h.e.mu.Lock()
		known := h.e.size >= 0
		if !known && h.e.sized == nil {
			h.e.sized = make(chan struct{})
		}
		sized := h.e.sized
		h.e.mu.Unlock()
		if !known {
			select {
			case <-call.done:
				if call.err != nil {
					return -1, call.err
				}
			case <-sized:
			case <-ctx.Done():
				return -1, ctx.Err()
			}
		}
	}
	h.e.mu.Lock()
	defer h.e.mu.Unlock()
	if h.e.size < 0 {
		return -1, fmt.Errorf("%s: size unknown", h.e.key)
	}
	return h.e.size, nil
}

// ReadAt reads len(p) bytes at off, filling missing chunks. It returns
// io.EOF when the read reaches the end of the blob.
func (h *Handle) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := h.readAt(ctx, p, off)
	h.account(off, int64(n))
	return n, err
}

func (h *Handle) readAt(ctx context.Context, p []byte, off int64) (int, error) {
	size, err := h.Size(ctx)
	if err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	if off >= size {
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), size)
	cs := h.c.opts.ChunkSize
	for pos, tries := off, 0; pos < end; {
		i := int(pos / cs)
		cend := min(int64(i+1)*cs, end)
		hit := h.e.hasChunk(i)
		gen := h.e.genNow()
		dst := p[pos-off : cend-off]
		copied, pass, err := h.e.ensureInto(ctx, i, h.plan, dst, pos-int64(i)*cs)
		if err != nil {
			return int(pos - off), err
		}
		if copied {
			// The bytes came from the fill's buffer as they arrived.
		} else if pass != nil {
			copy(dst, pass[pos-int64(i)*cs:])
		} else {
			err := h.e.readFile(dst, pos)
			if h.e.genNow() != gen {
				// A reset may have discarded the chunk while it was read, and
				// a refill overwritten it: read it again.
				if tries++; tries > maxResetRetries {
					return int(pos - off), fmt.Errorf("%s: reset %d times while being read", h.e.key, tries-1)
				}
				continue
			}
			if err != nil {
				return int(pos - off), err
			}
		}
		h.c.m.count(hit, cend-pos)
		pos = cend
	}
	n := int(end - off)
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *metrics) count(hit bool, n int64) {
	if hit {
		m.readBytes.WithLabelValues("hit").Add(float64(n))
	} else {
		m.readBytes.WithLabelValues("miss").Add(float64(n))
	}
}

// maxResetRetries bounds how often a read starts a chunk over because the
// blob was reset under it (each reset needs a fill to fail verification).
const maxResetRetries = 3

// errReset ends a copy straight from the data file that a reset of the blob
// overlapped: the bytes already sent may include chunks a refill rewrote.
var errReset = errors.New("blob was reset after a failed verification while being read")

func (e *entry) genNow() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.gen
}

func (e *entry) hasChunk(i int) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.size >= 0 && i < len(e.states) && e.states[i] != stateAbsent
}

// hasCheckedChunk: chunk i is present and may be served without a check.
func (e *entry) hasCheckedChunk(i int) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.size >= 0 && i < len(e.states) && e.states[i] != stateAbsent && !e.needsCheckLocked(i)
}

// readFile reads p at off, which lie within one present chunk.
func (e *entry) readFile(p []byte, off int64) error {
	cs := e.c.opts.ChunkSize
	if i := int(off / cs); e.fromMemoryOrDirect(i) {
		from := off - int64(i)*cs
		_, err := e.copyChunk(&sliceWriter{p: p}, i, from, from+int64(len(p)))
		return err
	}
	e.mu.Lock()
	f, err := e.filesLocked()
	e.mu.Unlock()
	if err != nil {
		return err
	}
	_, err = f.ReadAt(p, off)
	return err
}

// WriteRange writes bytes [off, off+n) to w, filling missing chunks as it
// goes. Present runs are copied from the backing file with io.Copy on an
// *os.File, which lets a TCP writer use sendfile; a complete blob is copied
// in one piece without looking at its chunks. It returns the bytes written.
func (h *Handle) WriteRange(ctx context.Context, w io.Writer, off, n int64) (int64, error) {
	written, err := h.writeRange(ctx, w, off, n)
	h.account(off, written)
	return written, err
}

func (h *Handle) writeRange(ctx context.Context, w io.Writer, off, n int64) (int64, error) {
	size, err := h.Size(ctx)
	if err != nil {
		return 0, err
	}
	if off < 0 || n < 0 || off > size || n > size-off {
		return 0, fmt.Errorf("range %d+%d outside %d-byte blob", off, n, size)
	}
	gen := h.e.genNow()
	if f, ok, err := h.completeFile(off); ok {
		if err != nil {
			return 0, err
		}
		written, err := h.writeComplete(w, f, n)
		if err == nil && h.e.genNow() != gen {
			err = fmt.Errorf("%s: %w", h.e.key, errReset)
		}
		return written, err
	}
	var rf *os.File
	defer func() {
		if rf != nil {
			rf.Close()
		}
	}()
	cs := h.c.opts.ChunkSize
	end := off + n
	var written int64
	for pos := off; pos < end; {
		i := int(pos / cs)
		hit := h.e.hasChunk(i)
		gen := h.e.genNow()
		if !hit && written == 0 {
			// The client's first bytes: stream them as they arrive. Later
			// chunks are written whole (one write each, from the held
			// copy): the read-ahead has them in flight or in already.
			cend := min(int64(i+1)*cs, end)
			m, err := h.e.streamPrefix(ctx, i, h.plan, w, pos-int64(i)*cs, cend-int64(i)*cs)
			written += m
			h.c.m.count(false, m)
			if err != nil {
				return written, err
			}
			if h.e.genNow() != gen {
				return written, fmt.Errorf("%s: %w", h.e.key, errReset)
			}
			if pos += m; pos == cend {
				continue
			}
		}
		pass, err := h.e.ensure(ctx, i, h.plan, false)
		if err != nil {
			return written, err
		}
		if pass != nil {
			cend := min(int64(i+1)*cs, end)
			m, err := w.Write(pass[pos-int64(i)*cs : cend-int64(i)*cs])
			written += int64(m)
			h.c.m.count(hit, int64(m))
			if err != nil {
				return written, err
			}
			pos = cend
			continue
		}
		if h.e.fromMemoryOrDirect(i) {
			cend := min(int64(i+1)*cs, end)
			m, err := h.e.copyChunk(w, i, pos-int64(i)*cs, cend-int64(i)*cs)
			written += int64(m)
			h.c.m.count(hit, int64(m))
			if err != nil {
				return written, err
			}
			if h.e.genNow() != gen {
				return written, fmt.Errorf("%s: %w", h.e.key, errReset)
			}
			pos = cend
			continue
		}
		// Extend over the chunks that are already present.
		j := i + 1
		for int64(j)*cs < end && h.e.hasCheckedChunk(j) {
			j++
		}
		cend := min(int64(j)*cs, end)
		if rf == nil {
			if rf, err = openForSendfile(filepath.Join(h.e.dir, "data")); err != nil {
				return written, fmt.Errorf("open cached %s: %w", h.e.key, err)
			}
		}
		if _, err := rf.Seek(pos, io.SeekStart); err != nil {
			return written, err
		}
		m, err := io.CopyN(w, rf, cend-pos)
		written += m
		h.c.m.count(hit, m)
		if err != nil {
			return written, err
		}
		if h.e.genNow() != gen {
			return written, fmt.Errorf("%s: %w", h.e.key, errReset)
		}
		pos = cend
	}
	return written, nil
}

// Prefetch fills the rest of the blob in the background with the given
// number of workers, sharing fills with foreground readers. It runs once
// per blob at a time.
func (h *Handle) Prefetch(workers int) {
	if workers <= 0 {
		workers = 1
	}
	e := h.e
	e.mu.Lock()
	if e.prefetching || e.size < 0 || e.complete() {
		e.mu.Unlock()
		return
	}
	e.prefetching = true
	n := len(e.states)
	e.mu.Unlock()
	h.c.ref(e)
	h.c.wg.Add(1)
	go func() {
		defer h.c.wg.Done()
		defer h.c.unref(e)
		ctx, cancel := context.WithCancel(h.c.life)
		defer cancel()
		next := make(chan int)
		var failed error
		var mu sync.Mutex
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range next {
					if _, err := e.ensure(ctx, i, h.plan, true); err != nil {
						mu.Lock()
						failed = err
						mu.Unlock()
						cancel()
					}
				}
			}()
		}
	feed:
		for i := 0; i < n; i++ {
			if e.hasChunk(i) {
				continue
			}
			select {
			case next <- i:
			case <-ctx.Done():
				break feed
			}
		}
		close(next)
		wg.Wait()
		e.mu.Lock()
		e.prefetching = false
		e.mu.Unlock()
		if failed != nil && !errors.Is(failed, context.Canceled) {
			h.c.log.Warn("prefetch stopped", "key", e.key, "err", failed)
		}
	}()
}
