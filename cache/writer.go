package cache

import (
	"errors"
	"os"
	"syscall"
)

// writePiece bounds one pwrite of a chunk's bytes. The kernel sizes the
// page-cache folios a buffered write allocates after the write's length, so
// one 1 MiB pwrite asks for 1 MiB folios. On a VM whose balloon reports free
// memory to the host (free page reporting, as on the Firecracker VMs peerd is
// benchmarked on), free blocks that large are the ones the host has taken
// back, and the first copy into them faults on the host for every page.
// Writing in small pieces avoids most of that cost (bench/README.md has
// the figures). On other hosts the smaller writes cost 32 syscalls per MiB
// instead of one, which is noise next to the copy.
const writePiece = 32 << 10

// writeAt writes a fetched chunk's bytes at off in the blob's data file.
// Writes of one blob are serialised: concurrent fills of the same file
// otherwise spin in the kernel on the inode's lock (ext4 takes it for every
// buffered write), burning CPU that the fills' network reads and the hash
// need. A fill waiting here keeps holding its own chunk buffer, as it did
// before, so serialising adds no memory: at most one buffer per fill in
// flight (Options.BackgroundFills plus the foreground readers) is waiting.
//
// With df (the data file open for direct I/O, for a chunk written that
// way) the bytes go to the disk in one write around the page cache; a file
// system that refuses it (EINVAL) turns direct I/O off for the cache and the
// bytes go the buffered way.
func (e *entry) writeAt(f, df *os.File, data []byte, off int64) error {
	if df != nil && off%directAlign == 0 && len(data)%directAlign == 0 && isAligned(data) {
		_, err := df.WriteAt(data, off)
		if !errors.Is(err, syscall.EINVAL) {
			return err
		}
		e.c.noDirect(err)
		e.leaveDirect()
	}
	e.writeMu.Lock()
	defer e.writeMu.Unlock()
	for len(data) > 0 {
		n := min(len(data), writePiece)
		if _, err := f.WriteAt(data[:n], off); err != nil {
			return err
		}
		data, off = data[n:], off+int64(n)
	}
	return nil
}
