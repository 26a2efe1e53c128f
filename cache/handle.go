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

// Served reports the bytes the handle's reads returned, by where they came
// from: the cache (present when the handle opened), or the source that
// fetched them since (including read-ahead fills for this reader).
func (h *Handle) Served() transfer.Bytes {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.served
}

// CountSince makes h count the chunks that landed since earlier opened as
// fetched, not cached: a face that learned a blob's size with one handle
// (fetching its first chunk) and reads it with another. It has no effect
// when earlier is of another incarnation of the blob's entry.
func (h *Handle) CountSince(earlier *Handle) {
	if earlier == nil || earlier.e != h.e {
		return
	}
	h.mu.Lock()
	h.openSeq = min(h.openSeq, earlier.openSeq)
	h.mu.Unlock()
}

// account adds bytes [off, off+n) the handle returned to its tally.
func (h *Handle) account(off, n int64) {
	if n <= 0 {
		return
	}
	cs := h.c.opts.ChunkSize
	e := h.e
	h.mu.Lock()
	since := h.openSeq
	h.mu.Unlock()
	var add transfer.Bytes
	e.mu.Lock()
	for pos, end := off, off+n; pos < end; {
		i := int(pos / cs)
		next := min(int64(i+1)*cs, end)
		b := next - pos
		var f uint64
		if i < len(e.from) {
			f = e.from[i]
		}
		switch {
		case f>>2 <= since:
			add.Cache += b
		case role(f&3) == roleLocal:
			add.Containerd += b
		case role(f&3) == rolePeers:
			add.Peers += b
		default:
			add.Origin += b
		}
		pos = next
	}
	e.mu.Unlock()
	h.mu.Lock()
	h.served.Add(add)
	h.mu.Unlock()
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
	// starts it with its own chunk.
	if _, err := h.e.ensure(ctx, 0, h.plan, true); err != nil {
		return -1, err
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
		pass, err := h.e.ensure(ctx, i, h.plan, false)
		if err != nil {
			return int(pos - off), err
		}
		dst := p[pos-off : cend-off]
		if pass != nil {
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

func (e *entry) readFile(p []byte, off int64) error {
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

// LocalReader reads a range the cache holds, without fetching. Copying it
// to a TCP connection with io.Copy uses sendfile.
type LocalReader struct {
	f       *os.File
	r       io.LimitedReader
	e       *entry
	gen     uint64 // e.trustedGen at open
	release func()
	once    sync.Once
}

// A LocalReader is what local stores hand the peer server and the faces (an
// io.ReadCloser), and io.Copy must find its WriteTo to use sendfile.
var (
	_ io.ReadCloser = (*LocalReader)(nil)
	_ io.WriterTo   = (*LocalReader)(nil)
)

// Read fails once a reset discarded trusted chunks (they may be rewritten
// under the reader), so a peer or a face never passes on such bytes.
func (l *LocalReader) Read(p []byte) (int, error) {
	n, err := l.r.Read(p)
	if l.e.trustedGen.Load() != l.gen {
		return n, fmt.Errorf("%s: %w", l.e.key, errReset)
	}
	return n, err
}

// File is the cache's backing file of the blob, open read-only, for callers
// that hand it to the kernel (FUSE passthrough) or read it themselves. It stays valid until
// Close; callers must use positioned reads and must not close it themselves.
func (l *LocalReader) File() *os.File { return l.f }

// WriteTo lets io.Copy hand the *os.File to the writer (sendfile).
func (l *LocalReader) WriteTo(w io.Writer) (int64, error) {
	n, err := io.Copy(w, &l.r)
	if err == nil && l.e.trustedGen.Load() != l.gen {
		err = fmt.Errorf("%s: %w", l.e.key, errReset)
	}
	return n, err
}

func (l *LocalReader) Close() error {
	l.once.Do(func() { l.f.Close(); l.release() })
	return nil
}

// OpenLocal opens bytes [off, off+n) of k if the cache holds all of them and
// may pass them on: bytes from the origin at once, bytes from peers only once
// the blob verified. Otherwise it returns an error wrapping blob.ErrNotFound
// at once; it never fetches. n < 0 means to the end. It also returns the size.
func (c *Cache) OpenLocal(k blob.Key, off, n int64) (*LocalReader, int64, error) {
	c.mu.Lock()
	e, ok := c.blobs[k]
	if ok {
		e.refs++
	}
	c.mu.Unlock()
	if !ok {
		return nil, -1, fmt.Errorf("%s: %w", k, blob.ErrNotFound)
	}
	release := func() { c.unref(e) }
	e.mu.Lock()
	size := e.size
	if size < 0 || !e.onDisk {
		e.mu.Unlock()
		release()
		return nil, -1, fmt.Errorf("%s: %w", k, blob.ErrNotFound)
	}
	if n < 0 || n > size-off {
		n = size - off
	}
	if off < 0 || n < 0 {
		e.mu.Unlock()
		release()
		return nil, size, fmt.Errorf("range %d+%d outside %d-byte blob", off, n, size)
	}
	cs := c.opts.ChunkSize
	var check []int
	for i := int(off / cs); int64(i)*cs < off+n; i++ {
		s := e.states[i]
		if s == stateAbsent || (s == stateUntrusted && !e.verified) {
			e.mu.Unlock()
			release()
			return nil, size, fmt.Errorf("%s chunk %d: %w", k, i, blob.ErrNotFound)
		}
		if e.needsCheckLocked(i) {
			check = append(check, i)
		}
	}
	gen := e.trustedGen.Load() // under e.mu: a reset after this is seen by the reader
	e.mu.Unlock()
	// Every chunk is checked before the file is handed out (FUSE
	// passthrough gives it to the kernel whole).
	for _, i := range check {
		if !e.checkChunk(i) {
			release()
			return nil, size, fmt.Errorf("%s chunk %d failed its check: %w", k, i, blob.ErrNotFound)
		}
	}
	f, err := openForSendfile(filepath.Join(e.dir, "data"))
	if err != nil {
		release()
		return nil, size, fmt.Errorf("open cached %s: %w", k, err)
	}
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		f.Close()
		release()
		return nil, size, err
	}
	c.mu.Lock()
	c.lru.MoveToFront(e.elem)
	c.mu.Unlock()
	return &LocalReader{f: f, r: io.LimitedReader{R: f, N: n}, e: e, gen: gen, release: release}, size, nil
}
