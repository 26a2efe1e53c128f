package cache

import (
	"crypto/sha256"
	"encoding/hex"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
)

// advanceHash feeds newly contiguous chunks to the blob's running hash and,
// once every byte was hashed, verifies the blob. Concurrent callers never
// wait: whoever holds the hash lock picks up their chunks. data, when not
// nil, holds the bytes at off that the caller just stored (of generation
// gen). scratch, when not nil, is a chunk buffer the caller lends for the
// chunks the hash reads back (their fills finished out of order); without
// one a pooled buffer is taken.
func (c *Cache) advanceHash(e *entry, off int64, gen uint64, data, scratch []byte) {
	for {
		if !e.hashMu.TryLock() {
			return
		}
		if data != nil {
			e.mu.Lock()
			cur, nChunks := e.gen, len(e.states)
			e.mu.Unlock()
			if e.hasher == nil || e.hashGen != cur {
				e.hasher, e.hashed, e.hashGen = sha256.New(), 0, cur
			}
			if cur == gen && e.hashed == off {
				i := int(off / c.opts.ChunkSize)
				e.hasher.Write(data)
				e.noteSumLocked(i, nChunks, chunkSum(data))
				e.hashed += int64(len(data))
				e.markHashed(i)
			}
			data = nil
		}
		done, err := e.hashLocked(scratch)
		e.hashMu.Unlock()
		if err != nil {
			c.log.Warn("hash cached blob", "key", e.key, "err", err)
			return
		}
		if done || !e.nextHashable() {
			return
		}
	}
}

// markHashed notes that the hash consumed chunk i, so its held copy may go.
func (e *entry) markHashed(i int) {
	e.mu.Lock()
	if h := e.heldLocked(i); h != nil {
		h.hashed = true
	}
	e.mu.Unlock()
}

func (e *entry) nextHashable() bool {
	e.hashMu.Lock()
	hashed := e.hashed
	gen := e.hashGen
	e.hashMu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.gone || e.verified || e.size < 0 || gen != e.gen {
		return false
	}
	i := int(hashed / e.c.opts.ChunkSize)
	return i < len(e.states) && e.states[i] != stateAbsent
}

// hashLocked hashes present chunks from e.hashed on; e.hashMu is held.
// Chunks come from their held copies when they have one, else are read
// whole, one read each, into scratch (or a pooled chunk buffer); without
// either, as for the re-verification of complete blobs at start (one
// goroutine per blob), they are read through a small buffer, so a restart
// with many such blobs does not hold a chunk buffer for each.
func (e *entry) hashLocked(scratch []byte) (bool, error) {
	var small []byte
	for {
		e.mu.Lock()
		if e.gone || e.verified || e.size < 0 {
			e.mu.Unlock()
			return true, nil
		}
		if e.hashGen != e.gen || e.hasher == nil {
			e.hasher, e.hashed, e.hashGen = sha256.New(), 0, e.gen
		}
		if e.hashed == e.size {
			e.mu.Unlock()
			return true, e.finishVerify()
		}
		i := int(e.hashed / e.c.opts.ChunkSize)
		if e.states[i] == stateAbsent {
			e.mu.Unlock()
			return false, nil
		}
		off, n, nChunks := e.hashed, e.chunkLen(i), len(e.states)
		h := e.heldLocked(i)
		if h != nil {
			h.refs++
		}
		direct := e.directChunkLocked(i)
		f, err := e.filesLocked()
		e.mu.Unlock()
		switch {
		case h != nil:
			b := (*h.buf)[:n]
			e.hasher.Write(b)
			e.noteSumLocked(i, nChunks, chunkSum(b))
			e.unrefHeld(h)
		case err != nil:
			return false, err
		case int64(cap(scratch)) >= n || direct:
			b := scratch
			if int64(cap(b)) < n || (direct && !isAligned(b)) {
				bp := chunkBuf(e.c.opts.ChunkSize)
				defer bufPool.Put(bp)
				scratch = *bp
				b = scratch
			}
			b = b[:n]
			if _, err := e.readChunkInto(i, b[:cap(b)]); err != nil {
				return false, err
			}
			e.hasher.Write(b)
			e.noteSumLocked(i, nChunks, chunkSum(b))
		default:
			if small == nil {
				small = make([]byte, 64<<10)
			}
			crc := crc32.New(castagnoli)
			if _, err := io.CopyBuffer(io.MultiWriter(e.hasher, crc), io.NewSectionReader(f, off, n), small); err != nil {
				return false, err
			}
			e.noteSumLocked(i, nChunks, crc.Sum32())
		}
		e.hashed += n
		e.markHashed(i)
	}
}

// finishVerify compares the finished hash with the key: a match marks the
// blob verified, a mismatch discards it and blames the peers that served it.
func (e *entry) finishVerify() error {
	sum := hex.EncodeToString(e.hasher.Sum(nil))
	if sum == e.key.Hex() {
		e.mu.Lock()
		sums := e.newSums
		if len(sums) != len(e.states) {
			sums = make([]uint32, len(e.states)) // only an empty blob has no sums noted
		}
		e.newSums = nil
		e.verified = true
		e.directMode = false // nothing is written any more: reads may use the page cache
		e.origins = nil
		// Every chunk was just hashed from the bytes written this run.
		e.sums, e.checked, e.unchecked = sums, make([]bool, len(sums)), 0
		for i := range e.checked {
			e.checked[i] = true
		}
		m := meta{Key: e.key, Size: e.size, ChunkSize: e.c.opts.ChunkSize, Verified: true, Created: e.created}
		dir := e.dir
		e.mu.Unlock()
		e.c.m.verify.WithLabelValues("ok").Inc()
		// Chunks and their sums must be durable before the blob is called
		// verified on disk.
		err := e.flush()
		if err == nil {
			err = writeSums(dir, sums)
		}
		if err == nil {
			err = writeMeta(dir, m)
		}
		if isDiskFull(err) {
			// Verified in memory; a restart verifies it again.
			e.c.diskFull(err)
			return nil
		}
		return err
	}
	e.c.log.Error("cached blob failed verification; discarding", "key", e.key, "got", "sha256:"+sum)
	e.reset()
	e.c.m.verify.WithLabelValues("mismatch").Inc()
	return nil
}

// reset discards the chunks that may have made the blob fail verification.
// When peers served some of it, only their (untrusted) chunks go: the bytes
// from the origin or containerd are not the suspects, and keeping them means
// a reader copying one of them (a handle, a peer's or a face's sendfile)
// keeps reading the bytes it was told are present. When every chunk came
// from trusted sources, all go. The data file is never truncated: a
// discarded chunk's bytes stay until a refill overwrites them, and the
// readers that copy chunks a reset may discard notice it (gen, trustedGen)
// and retry or fail instead of passing on what a refill wrote under them.
// A size that no trusted source confirmed came from a peer and is forgotten
// with its chunks, so the origin's size is not refused against it.
func (e *entry) reset() {
	e.flushMu.Lock()
	e.mu.Lock()
	origins, blamers := e.origins, e.blamers
	announced := e.announced
	e.announced = false
	e.origins = nil
	e.gen++
	e.dropHeldLocked()
	untrusted := false
	for _, s := range e.states {
		if s == stateUntrusted {
			untrusted = true
			break
		}
	}
	forget := !e.sizeTrusted
	if forget || !untrusted {
		e.trustedGen.Add(1)
	}
	var freed int64
	for i, s := range e.states {
		if s == stateAbsent || (s == stateTrusted && untrusted && !forget) {
			continue
		}
		e.states[i] = stateAbsent
		e.nPresent--
		freed += e.chunkLen(i)
	}
	e.present -= freed
	e.verified = false
	if forget {
		// Nothing on disk is worth keeping under a size nobody vouched for;
		// the next fill lays out fresh files (new inodes: readers that have
		// the old data file open keep its bytes).
		if e.f != nil {
			e.closeFilesLocked()
		}
		e.onDisk = false
		e.directMode = false
		for _, name := range []string{"meta", "chunks", "data"} {
			os.Remove(filepath.Join(e.dir, name))
		}
		e.size, e.states, e.nPresent, e.present, e.dirtyIdx = -1, nil, 0, 0, nil
		e.sums, e.checked, e.unchecked = nil, nil, 0
	} else if _, err := e.filesLocked(); err == nil {
		// The kept chunks' bytes must be durable before the map names them.
		fdatasync(e.f)
		e.bm.WriteAt(e.states, 0)
		fdatasync(e.bm)
		e.dirtyIdx = nil
	}
	e.mu.Unlock()
	e.flushMu.Unlock()
	e.c.used.Add(-freed)
	if announced && e.key.Verifiable() {
		e.c.notify(e.key, false)
	}
	seen := map[servedBy]bool{}
	for _, sb := range origins {
		if seen[sb] {
			continue
		}
		seen[sb] = true
		if b := blamers[sb.source]; b != nil {
			b.Blame(e.key, sb.peer)
		}
	}
}

// servedBy names who served an untrusted chunk: the source (by Name) and the
// peer within it, so a failed verification blames exactly those.
type servedBy struct {
	source, peer string
}
