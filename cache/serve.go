package cache

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
)

// completeFile opens the backing file of a blob whose every chunk is present,
// positioned at off. It reports ok=false, and opens nothing, when the blob is
// not complete yet: the caller then takes the chunk-by-chunk path that fills
// what is missing.
//
// A complete blob needs none of that path's per-chunk bookkeeping (presence
// checks, read-ahead, fill calls), so a hit costs one look at the entry, one
// open and one sendfile, as it does for http.FileServer. The caller's handle
// keeps the entry referenced, which keeps it from being evicted while the
// file is read; the open file would keep the bytes readable even so.
func (h *Handle) completeFile(off int64) (f *os.File, ok bool, err error) {
	e := h.e
	e.mu.Lock()
	ok = e.complete() && e.onDisk && !e.gone && e.unchecked == 0 && !e.directMode
	e.mu.Unlock()
	if !ok {
		return nil, false, nil
	}
	f, err = openForSendfile(filepath.Join(e.dir, "data"))
	if err != nil {
		return nil, true, fmt.Errorf("open cached %s: %w", e.key, err)
	}
	if off != 0 {
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			f.Close()
			return nil, true, fmt.Errorf("seek cached %s: %w", e.key, err)
		}
	}
	return f, true, nil
}

// openForSendfile opens a regular file read-only for sendfile. os.Open would
// also try to add it to the network poller (four fcntl calls and a failing
// epoll_ctl for a regular file, on every request); os.NewFile of a blocking
// descriptor costs one fcntl. Reads of a regular file block either way.
func openForSendfile(path string) (*os.File, error) {
	var fd int
	var err error
	for {
		fd, err = syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// writeComplete copies [off, off+n) of a complete blob to w straight from the
// backing file. The *os.File sits directly under an io.LimitedReader, which
// is what net/http's ReadFrom and the TCP connection's sendfile look for; no
// other wrapper may come between them. It counts the bytes once.
func (h *Handle) writeComplete(w io.Writer, f *os.File, n int64) (int64, error) {
	defer f.Close()
	written, err := io.Copy(w, &io.LimitedReader{R: f, N: n})
	h.c.m.count(true, written)
	if err == nil && written < n {
		// The file is shorter than the blob it claims to hold.
		err = fmt.Errorf("cached %s: %w after %d of %d bytes", h.e.key, io.ErrUnexpectedEOF, written, n)
	}
	return written, err
}
