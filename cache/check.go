package cache

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
)

// Chunk checks: a verified blob's bytes can still go bad on disk (a flipped
// bit, a damaged sector, an edit while peerd was stopped), and the digest
// that verified them is only checked again when the whole blob is hashed.
// So when a blob verifies, the cache records one CRC-32C per chunk, taken
// from the very bytes the SHA-256 verification hashed, in a "sums" file
// written (synced, renamed) before "meta" says verified. After each start
// every chunk of a verified blob is checked against its sum on its first
// read, before any face gets a byte of it (Handle.ReadAt and WriteRange
// through ensure, OpenLocal for the peer server, /v2/ and FUSE, whose
// passthrough and local reads open the whole blob, so all its chunks are
// checked before the kernel is handed the file); an in-memory bitmap
// remembers the chunks checked, so later reads cost one look at it. A chunk
// that fails is discarded (absent, the blob no longer verified on disk or in
// memory, withdrawn from the DHT until it is stored again), counted in
// peerd_cache_corrupt_chunks_total, and refilled from the normal sources;
// the blob then verifies again by its digest. CRC-32C (hardware-assisted)
// rather than SHA-256: it detects every error of up to 32 bits in a chunk
// and random damage all but 2^-32 of the time at a small fraction of the
// cost, and guarding against whoever can write the cache's files (and so the
// sums too) is not its job. A blob verified by a version that wrote no sums
// is verified again at start, which records them.

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func chunkSum(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// noteSumLocked records chunk i's sum in the running verification (e.hashMu
// held); n is the blob's number of chunks.
func (e *entry) noteSumLocked(i, n int, sum uint32) {
	if len(e.newSums) != n {
		e.newSums = make([]uint32, n)
	}
	if i < n {
		e.newSums[i] = sum
	}
}

func writeSums(dir string, sums []uint32) error {
	b := make([]byte, 4*len(sums))
	for i, s := range sums {
		binary.LittleEndian.PutUint32(b[4*i:], s)
	}
	return writeFileAtomic(filepath.Join(dir, "sums"), b)
}

func readSums(dir string, n int) ([]uint32, error) {
	b, err := os.ReadFile(filepath.Join(dir, "sums"))
	if err != nil {
		return nil, err
	}
	if len(b) != 4*n {
		return nil, fmt.Errorf("sums: %d bytes for %d chunks", len(b), n)
	}
	sums := make([]uint32, n)
	for i := range sums {
		sums[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return sums, nil
}

// needsCheckLocked: chunk i is present and not yet checked since the start
// (e.mu held).
func (e *entry) needsCheckLocked(i int) bool {
	return e.unchecked > 0 && i < len(e.checked) && !e.checked[i] && e.states[i] != stateAbsent
}

// markCheckedLocked records that chunk i's bytes on disk are known good
// (e.mu held).
func (e *entry) markCheckedLocked(i int) {
	if i < len(e.checked) && !e.checked[i] {
		e.checked[i] = true
		e.unchecked--
	}
}

// checkChunk checks chunk i against its sum if it needs it. It reports
// false when the chunk failed and was discarded.
func (e *entry) checkChunk(i int) bool {
	e.mu.Lock()
	if !e.needsCheckLocked(i) {
		e.mu.Unlock()
		return true
	}
	f, err := e.filesLocked()
	if err != nil {
		// The read that follows fails on the same files; nothing is served.
		e.mu.Unlock()
		return true
	}
	off, n, want := int64(i)*e.c.opts.ChunkSize, e.chunkLen(i), e.sums[i]
	e.mu.Unlock()
	bp := chunkBuf(e.c.opts.ChunkSize)
	defer bufPool.Put(bp)
	b := (*bp)[:n]
	_, err = f.ReadAt(b, off)
	got := chunkSum(b)
	if err == nil && got == want {
		e.mu.Lock()
		e.markCheckedLocked(i)
		e.mu.Unlock()
		return true
	}
	e.discardCorrupt(i, err, got, want)
	return false
}

// discardCorrupt marks chunk i absent after it failed its check: the blob is
// no longer verified (on disk first, so a crash cannot bring the bad chunk
// back as verified), its running hash starts over, and it is withdrawn.
func (e *entry) discardCorrupt(i int, readErr error, got, want uint32) {
	e.hashMu.Lock()
	e.flushMu.Lock()
	e.mu.Lock()
	if e.gone || i >= len(e.states) || e.states[i] == stateAbsent || (i < len(e.checked) && e.checked[i]) {
		e.mu.Unlock()
		e.flushMu.Unlock()
		e.hashMu.Unlock()
		return
	}
	n := e.chunkLen(i)
	e.states[i] = stateAbsent
	e.nPresent--
	e.present -= n
	e.verified = false
	e.hasher = nil // verify again from the first byte once refilled
	announced := e.announced
	e.announced = false
	m := meta{Key: e.key, Size: e.size, ChunkSize: e.c.opts.ChunkSize, Created: e.created}
	dir := e.dir
	if _, err := e.filesLocked(); err == nil {
		e.bm.WriteAt([]byte{stateAbsent}, int64(i))
		fdatasync(e.bm)
	}
	e.mu.Unlock()
	err := writeMeta(dir, m)
	e.flushMu.Unlock()
	e.hashMu.Unlock()
	if err != nil {
		e.c.log.Warn("cannot mark a blob with a corrupt chunk unverified on disk", "key", e.key, "err", err)
	}
	e.c.used.Add(-n)
	e.c.m.corrupt.Inc()
	e.c.log.Error("cached chunk failed its check; discarding it and fetching it again", "key", e.key, "chunk", i,
		"sum", fmt.Sprintf("%08x", got), "want", fmt.Sprintf("%08x", want), "readErr", readErr)
	if announced && e.key.Verifiable() {
		e.c.notify(e.key, false)
	}
}
