package cache

import (
	"container/list"
	"fmt"
	"hash"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/transfer"
)

// entry is one blob's state. Lock order: Cache.mu, then entry.flushMu, then entry.mu.
type entry struct {
	c   *Cache
	key blob.Key
	dir string

	// guarded by Cache.mu
	refs    int
	elem    *list.Element
	lastUse time.Time

	flushMu sync.Mutex // serialises flush against reset/destroy
	writeMu sync.Mutex // serialises writes into the data file (writer.go)

	mu       sync.Mutex
	size     int64 // -1 until learned
	states   []byte
	nPresent int
	present  int64
	verified bool
	gen      uint64 // bumped on reset, so stale fills are dropped and readers of discarded chunks retry
	// trustedGen is bumped when a reset discards trusted chunks, the only
	// ones OpenLocal's readers copy; read without e.mu on their hot path.
	trustedGen atomic.Uint64
	// sizeTrusted: a trusted source reported (or confirmed) size.
	sizeTrusted bool
	f, bm       *os.File // the blob's files, opened on first use (filesLocked)
	// directMode: the blob was laid out fresh this run and has not
	// verified; df is its data file opened for direct I/O while its files
	// are open (direct.go).
	directMode  bool
	df          *os.File
	held        map[int]*heldChunk // chunk -> its held copy (held.go)
	onDisk      bool               // the blob's files exist, open or not
	inflight    map[int]*fillCall
	sized       chan struct{} // closed when the size is learned (made by a waiter)
	dirtyIdx    []int
	origins     map[int]servedBy // chunk -> the source and peer that served it (untrusted chunks)
	blamers     map[string]blob.Blamer
	created     time.Time
	gone        bool
	prefetching bool      // a background fetch of the rest of the blob is running
	failedAt    time.Time // last fill failure, to keep read-ahead from hammering a dead source
	announced   bool      // the announcer was told Holding and not yet Dropped
	pulls       int       // open handles whose plan makes a swarm pull
	pullPlan    *Plan     // the plan of the latest such handle, for fills peers ask for

	// from says where each chunk's bytes came from, for the handles'
	// provenance: fillSeq<<2 | role of the fill that landed it (0: loaded
	// from disk at start). filled counts bytes landed by role since start.
	from    []uint64
	fillSeq uint64
	filled  [3]int64
	// peersNoted lists the peers whose bytes landed since the start (at
	// most maxPeersNoted), for the debug page and measurements.
	peersNoted []string

	// sums are the chunks' CRC-32Cs recorded when the blob verified (nil
	// before); checked marks the chunks checked against them since the
	// start, unchecked counts the others (check.go).
	sums      []uint32
	checked   []bool
	unchecked int

	hashMu  sync.Mutex // guards hasher, hashed, newSums
	newSums []uint32   // the sums of the chunks hashed so far
	hasher  hash.Hash
	hashed  int64
	hashGen uint64
}

type fillCall struct {
	done chan struct{}
	err  error
	pass []byte // bytes that could not be stored (cache full), read-only
	// atOrigin is closed when the fill asks a source with no peer stage
	// after it (the origin): from then on it depends on no peer, so peers
	// may wait for it without risk of waiting for each other (AwaitLocal).
	atOrigin   chan struct{}
	originOnce sync.Once

	// The chunk's bytes as they arrive, for readers that need only a
	// prefix of it (a header): they copy from the fill's buffer instead of
	// waiting for the whole chunk (copyIfIn). Guarded by pmu; pbuf is nil
	// once the buffer may be reused.
	pmu   sync.Mutex
	pbuf  []byte
	pgot  int64
	pgrew chan struct{} // closed when pgot grows or the buffer is retired
	pgone bool
	// pwanted: a reader waits on pgrew (copyIfIn, copyAvail).
	pwanted bool
}

func newFillCall() *fillCall {
	return &fillCall{done: make(chan struct{}), atOrigin: make(chan struct{}), pgrew: make(chan struct{})}
}

// publish says the first got bytes of buf hold the chunk's bytes. After the
// chunk's first bytes it yields when a reader waits for them (a client
// waiting for its first byte), so that reader runs now rather than after
// this goroutine has read and stored the rest of the chunk; a fill nobody
// waits on this way keeps its CPU.
func (c *fillCall) publish(buf []byte, got int64) {
	c.pmu.Lock()
	if c.pgone || got <= c.pgot {
		c.pmu.Unlock()
		return
	}
	yield := c.pgot == 0 && c.pwanted
	c.pbuf, c.pgot = buf, got
	close(c.pgrew)
	c.pgrew = make(chan struct{})
	c.pmu.Unlock()
	if yield {
		runtime.Gosched()
	}
}

// retire ends publishing: the fill's buffer may be reused from now on.
func (c *fillCall) retire() {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	if !c.pgone {
		c.pgone, c.pbuf = true, nil
		close(c.pgrew)
	}
}

// copyIfIn copies the chunk's bytes [from, from+len(dst)) into dst when
// they have arrived; otherwise it returns a channel closed when more do.
// Only a strict prefix of the chunk is copied early: a reader that needs
// the chunk's last byte waits for the chunk to be stored, as it would
// anyway, and finds it in the cache when its read returns.
func (c *fillCall) copyIfIn(dst []byte, from int64) (bool, <-chan struct{}) {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	if end := from + int64(len(dst)); c.pbuf != nil && end <= c.pgot && end < int64(len(c.pbuf)) {
		copy(dst, c.pbuf[from:])
		return true, nil
	}
	if c.pgone || (c.pbuf != nil && from+int64(len(dst)) >= int64(len(c.pbuf))) {
		return false, nil // wait for the fill to end
	}
	c.pwanted = true
	return false, c.pgrew
}

// copyAvail copies into dst the chunk's bytes from from (up to limit) that
// have arrived, and returns how many; with none to copy it returns the
// channel closed when more arrive, or nil when the fill is ending. Like
// copyIfIn it never copies the chunk's last byte: a reader of that waits for
// the chunk to be stored.
func (c *fillCall) copyAvail(dst []byte, from, limit int64) (int, <-chan struct{}) {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	if c.pbuf != nil {
		if end := min(c.pgot, int64(len(c.pbuf))-1, limit, from+int64(len(dst))); end > from {
			return copy(dst, c.pbuf[from:end]), nil
		}
		if from >= int64(len(c.pbuf))-1 || from >= limit {
			return 0, nil
		}
	}
	if c.pgone {
		return 0, nil
	}
	c.pwanted = true
	return 0, c.pgrew
}

func (c *fillCall) reachedOrigin() bool {
	select {
	case <-c.atOrigin:
		return true
	default:
		return false
	}
}

func newEntry(c *Cache, k blob.Key, dir string) *entry {
	return &entry{c: c, key: k, dir: dir, size: -1, inflight: map[int]*fillCall{}}
}

func (e *entry) chunkLen(i int) int64 {
	cs := e.c.opts.ChunkSize
	off := int64(i) * cs
	if off+cs > e.size {
		return e.size - off
	}
	return cs
}

func (e *entry) setSize(size int64) {
	e.size = size
	if e.sized != nil {
		close(e.sized)
		e.sized = nil
	}
	e.states = make([]byte, numChunks(size, e.c.opts.ChunkSize))
	e.from = make([]uint64, len(e.states))
}

func (e *entry) complete() bool { return e.size >= 0 && e.nPresent == len(e.states) }

func (e *entry) hasFiles() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.onDisk
}

// filesLocked returns the blob's data file, opening its files if they exist
// and are not open yet: blobs loaded at start keep no file open until used,
// so a cache of many blobs does not cost two descriptors per blob. e.mu is
// held.
func (e *entry) filesLocked() (*os.File, error) {
	if e.f != nil {
		return e.f, nil
	}
	if !e.onDisk || e.gone {
		return nil, fmt.Errorf("%s: cache file closed", e.key)
	}
	f, err := os.OpenFile(filepath.Join(e.dir, "data"), os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	bm, err := os.OpenFile(filepath.Join(e.dir, "chunks"), os.O_RDWR, 0)
	if err != nil {
		f.Close()
		return nil, err
	}
	e.f, e.bm = f, bm
	if e.directMode {
		if e.df = e.openDirectLocked(f.Name()); e.df == nil {
			e.directMode = false
		}
	}
	return f, nil
}

func (e *entry) info() Info {
	e.mu.Lock()
	defer e.mu.Unlock()
	return Info{Key: e.key, Size: e.size, Present: e.present, Complete: e.complete(), Verified: e.verified, ModTime: e.created,
		Filled: transfer.Bytes{Containerd: e.filled[roleLocal], Peers: e.filled[rolePeers], Origin: e.filled[roleOrigin]},
		Peers:  slices.Clone(e.peersNoted)}
}

// createFilesLocked lays out the blob's folder once its size is known, or opens its files. e.mu is held.
func (e *entry) createFilesLocked() error {
	if e.onDisk {
		_, err := e.filesLocked()
		return err
	}
	if err := e.layOutLocked(); err != nil {
		// A half-made folder (the disk filled up) holds no chunk: remove it
		// so it takes no space and load finds nothing to drop.
		os.RemoveAll(e.dir)
		return err
	}
	return nil
}

func (e *entry) layOutLocked() error {
	if err := os.MkdirAll(e.dir, 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(e.dir, "data"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(e.size); err != nil {
		f.Close()
		return err
	}
	bm, err := os.OpenFile(filepath.Join(e.dir, "chunks"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		f.Close()
		return err
	}
	// The chunk map's blocks are allocated now, so a flush never needs
	// space the data filled.
	if err := allocate(bm, int64(len(e.states))); err != nil {
		f.Close()
		bm.Close()
		return err
	}
	if err := writeMeta(e.dir, meta{Key: e.key, Size: e.size, ChunkSize: e.c.opts.ChunkSize, Created: e.created}); err != nil {
		f.Close()
		bm.Close()
		return err
	}
	e.f, e.bm, e.onDisk = f, bm, true
	e.df = e.openDirectLocked(f.Name())
	e.directMode = e.df != nil
	return nil
}

// closeIdleFiles closes the files of an entry nobody uses (Cache.mu held,
// refs 0), so that descriptors follow the blobs in use, not the blobs
// cached. Files with chunks still to flush stay open for the flusher, as do
// those of an entry being flushed right now.
func (e *entry) closeIdleFiles() {
	if !e.flushMu.TryLock() {
		return
	}
	defer e.flushMu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.f != nil && len(e.dirtyIdx) == 0 {
		e.closeFilesLocked()
	}
}

// closeFilesLocked closes the blob's open files. e.mu is held.
func (e *entry) closeFilesLocked() {
	e.f.Close()
	e.bm.Close()
	if e.df != nil {
		e.df.Close()
	}
	e.f, e.bm, e.df = nil, nil, nil
}

func (e *entry) closeFiles() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.f != nil {
		e.closeFilesLocked()
	}
}

// destroy deletes the blob's files; the entry is already out of the index.
// It reports whether the blob had any bytes.
func (e *entry) destroy() bool {
	e.flushMu.Lock()
	defer e.flushMu.Unlock()
	e.mu.Lock()
	had := e.present > 0 || e.announced
	e.announced = false
	e.gone = true
	e.onDisk = false
	e.dropHeldLocked()
	if e.f != nil {
		e.closeFilesLocked()
	}
	e.mu.Unlock()
	os.RemoveAll(e.dir)
	return had
}

// flush makes chunks written since the last flush durable: data first, then
// their bytes in the chunk map.
func (e *entry) flush() error {
	e.flushMu.Lock()
	defer e.flushMu.Unlock()
	e.mu.Lock()
	idx := e.dirtyIdx
	e.dirtyIdx = nil
	f, bm, gone := e.f, e.bm, e.gone
	e.mu.Unlock()
	if len(idx) == 0 || gone || f == nil {
		return nil
	}
	if err := fdatasync(f); err != nil {
		return fmt.Errorf("sync data: %w", err)
	}
	e.mu.Lock()
	buf := make([]byte, 1)
	for _, i := range idx {
		if i >= len(e.states) {
			continue
		}
		buf[0] = e.states[i]
		if _, err := bm.WriteAt(buf, int64(i)); err != nil {
			e.mu.Unlock()
			return fmt.Errorf("write chunk map: %w", err)
		}
	}
	e.mu.Unlock()
	return fdatasync(bm)
}

// noteFromLocked records that chunk i's n bytes just came from role r. e.mu
// is held.
func (e *entry) noteFromLocked(i int, r role, n int) {
	if i >= len(e.from) {
		return
	}
	e.fillSeq++
	e.from[i] = e.fillSeq<<2 | uint64(r)
	e.filled[r] += int64(n)
}

// maxPeersNoted bounds the peers an entry remembers having served it.
const maxPeersNoted = 16

// notePeerLocked remembers that peer p served some of the blob. e.mu is held.
func (e *entry) notePeerLocked(p string) {
	if len(e.peersNoted) < maxPeersNoted && !slices.Contains(e.peersNoted, p) {
		e.peersNoted = append(e.peersNoted, p)
	}
}
