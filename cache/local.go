package cache

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/peerd-project/peerd/blob"
)

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
// It is nil for a blob that has not verified yet and is read with direct
// I/O (direct.go); callers that want the file open verified blobs only.
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
	l.once.Do(func() {
		if l.f != nil {
			l.f.Close()
		}
		l.release()
	})
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
	direct := e.directMode
	e.mu.Unlock()
	// Every chunk is checked before the file is handed out (FUSE
	// passthrough gives it to the kernel whole).
	for _, i := range check {
		if !e.checkChunk(i) {
			release()
			return nil, size, fmt.Errorf("%s chunk %d failed its check: %w", k, i, blob.ErrNotFound)
		}
	}
	if direct {
		// Nothing may read the file through the page cache yet (direct.go).
		c.mu.Lock()
		c.lru.MoveToFront(e.elem)
		c.mu.Unlock()
		dr := &directReader{e: e, pos: off, end: off + n}
		return &LocalReader{r: io.LimitedReader{R: dr, N: n}, e: e, gen: gen, release: func() { dr.Close(); release() }}, size, nil
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
