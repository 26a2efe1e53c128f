package cache

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/peerd-project/peerd/blob"
	"golang.org/x/sys/unix"
)

// On disk, each blob lives in its own folder:
//
//	<dir>/blobs/<alg>/<hex>/data    the blob's bytes, a sparse file of its full size
//	<dir>/blobs/<alg>/<hex>/chunks  one byte per chunk: 0 absent, 1 trusted, 2 untrusted
//	<dir>/blobs/<alg>/<hex>/meta    JSON: key, size, chunk size, verified
//
// A chunk's byte in "chunks" is written only after the data file was synced,
// so after a crash every chunk marked present reads back as it was written.

const (
	stateAbsent    byte = 0
	stateTrusted   byte = 1 // from the origin or a local store: may be re-served at once
	stateUntrusted byte = 2 // from a peer: re-served only once the blob verified
)

type meta struct {
	Key       blob.Key  `json:"key"`
	Size      int64     `json:"size"`
	ChunkSize int64     `json:"chunkSize"`
	Verified  bool      `json:"verified"`
	Created   time.Time `json:"created"`
}

func blobDir(root string, k blob.Key) string {
	return filepath.Join(root, "blobs", k.Algorithm(), k.Hex())
}

// writeFileAtomic writes data to path through a synced temporary file and a
// rename, then syncs the folder, so path holds either the old or the new bytes.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func writeMeta(dir string, m meta) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, "meta"), b)
}

func readMeta(dir string) (meta, error) {
	var m meta
	b, err := os.ReadFile(filepath.Join(dir, "meta"))
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("parse %s/meta: %w", dir, err)
	}
	return m, nil
}

func fdatasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// maxChunks bounds the chunks of one blob (16 TiB at 1 MiB chunks): a size
// a source or a damaged meta file reports beyond it is refused, not
// allocated (a chunk map of that many bytes) or overflowed.
const maxChunks = 1 << 24

// checkSize refuses a blob size the cache cannot hold a chunk map for.
func (c *Cache) checkSize(size int64) error {
	if size < 0 {
		return fmt.Errorf("negative size %d", size)
	}
	if size > maxChunks*c.opts.ChunkSize {
		return fmt.Errorf("size %d is more than the %d chunks of %d bytes a blob may have", size, maxChunks, c.opts.ChunkSize)
	}
	return nil
}

func numChunks(size, chunk int64) int {
	if size <= 0 {
		return 0
	}
	return int((size + chunk - 1) / chunk)
}

// isDiskFull reports whether err is the filesystem refusing a write for want
// of space or quota.
func isDiskFull(err error) bool {
	return err != nil && (errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT))
}

// allocate sizes f to n bytes with its blocks reserved, so later writes in
// that range cannot fail for want of space; a filesystem without fallocate
// gets a plain (sparse) truncate.
func allocate(f *os.File, n int64) error {
	if n > 0 {
		err := unix.Fallocate(int(f.Fd()), 0, 0, n)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
			return err
		}
	}
	return f.Truncate(n)
}

// punchHole frees the blocks of [off, off+n) in f, keeping its size; it is
// best effort (a filesystem without hole punching keeps them).
func punchHole(f *os.File, off, n int64) {
	unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}
