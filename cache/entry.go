package cache

import (
	"container/list"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/peerd-project/peerd/blob"
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
	onDisk      bool     // the blob's files exist, open or not
	inflight    map[int]*fillCall
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
}

func newFillCall() *fillCall {
	return &fillCall{done: make(chan struct{}), atOrigin: make(chan struct{})}
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
	e.states = make([]byte, numChunks(size, e.c.opts.ChunkSize))
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
	return f, nil
}

func (e *entry) info() Info {
	e.mu.Lock()
	defer e.mu.Unlock()
	i := Info{Key: e.key, Size: e.size, Present: e.present, Complete: e.complete(), Verified: e.verified, ModTime: e.created}
	return i
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
		e.f.Close()
		e.bm.Close()
		e.f, e.bm = nil, nil
	}
}

func (e *entry) closeFiles() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.f != nil {
		e.f.Close()
		e.bm.Close()
		e.f, e.bm = nil, nil
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
	if e.f != nil {
		e.f.Close()
		e.bm.Close()
		e.f, e.bm = nil, nil
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

// ensure makes chunk i present, fetching it under plan p unless another
// caller already is. It returns pass != nil when the chunk could not be
// stored and its bytes are handed over directly.
func (e *entry) ensure(ctx context.Context, i int, p Plan, background bool) (pass []byte, err error) {
	e.mu.Lock()
	if e.size >= 0 && i < len(e.states) && e.needsCheckLocked(i) {
		// First read of a verified chunk since the start: check it (a
		// chunk that fails is discarded, and filled below).
		e.mu.Unlock()
		e.checkChunk(i)
		e.mu.Lock()
	}
	// i past the chunks: an empty blob, whose size a concurrent fill learned
	// after the caller looked (nothing to fill).
	if e.size >= 0 && (i >= len(e.states) || e.states[i] != stateAbsent) {
		e.mu.Unlock()
		if !background {
			e.readAhead(i, p) // keep the window ahead of a sequential reader full
		}
		return nil, nil
	}
	call, ok := e.inflight[i]
	if !ok {
		if e.c.closing() {
			e.mu.Unlock()
			return nil, errors.New("cache is closing")
		}
		call = newFillCall()
		e.inflight[i] = call
		e.c.ref(e)
		e.c.wg.Add(1)
		go func() {
			defer e.c.wg.Done()
			defer e.c.unref(e)
			e.fill(i, p, call)
		}()
	}
	e.mu.Unlock()
	if !background {
		e.readAhead(i, p)
	}
	select {
	case <-call.done:
		return call.pass, call.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// readAhead starts background fills of the chunks after i when the reader
// looks sequential (the chunk before i is present).
func (e *entry) readAhead(i int, p Plan) {
	ra := e.c.opts.ReadAhead
	e.mu.Lock()
	seq := e.size >= 0 && (i == 0 || (i-1 < len(e.states) && e.states[i-1] != stateAbsent)) && time.Since(e.failedAt) > time.Second
	n := len(e.states)
	e.mu.Unlock()
	if !seq || ra <= 0 {
		return
	}
	for j := i + 1; j <= i+ra && j < n; j++ {
		e.background(j, p)
	}
}

// background fills chunk j if a background slot is free; it never blocks.
func (e *entry) background(j int, p Plan) {
	e.mu.Lock()
	busy := j >= len(e.states) || e.states[j] != stateAbsent || e.inflight[j] != nil
	e.mu.Unlock()
	if busy {
		return
	}
	select {
	case e.c.bg <- struct{}{}:
	default:
		return
	}
	e.c.ref(e)
	e.c.wg.Add(1)
	go func() {
		defer e.c.wg.Done()
		defer e.c.unref(e)
		defer func() { <-e.c.bg }()
		ctx, cancel := context.WithTimeout(e.c.life, e.c.opts.FillTimeout)
		defer cancel()
		e.ensure(ctx, j, p, true)
	}()
}

var bufPool = sync.Pool{New: func() any { return new([]byte) }}

// chunkBuf returns a pooled buffer of at least cs bytes; put it back in bufPool.
func chunkBuf(cs int64) *[]byte {
	bp := bufPool.Get().(*[]byte)
	if int64(cap(*bp)) < cs {
		*bp = make([]byte, cs)
	}
	return bp
}

// fill fetches chunk i (or, with the size unknown, chunk 0 and the size).
func (e *entry) fill(i int, p Plan, call *fillCall) {
	ctx, cancel := context.WithTimeout(e.c.life, e.c.opts.FillTimeout)
	defer cancel()
	start := time.Now()
	bp := chunkBuf(e.c.opts.ChunkSize)
	defer bufPool.Put(bp)
	buf := (*bp)[:e.c.opts.ChunkSize]
	e.mu.Lock()
	gen := e.gen // bytes fetched before a reset must not land after it
	e.mu.Unlock()
	n, st, origin, err := e.fetch(ctx, i, p, buf, call)
	if err == nil {
		call.pass, err = e.store(i, gen, buf[:n], st, origin)
	}
	e.mu.Lock()
	delete(e.inflight, i)
	if err != nil {
		e.failedAt = time.Now()
	}
	e.mu.Unlock()
	call.err = err
	close(call.done)
	if err != nil {
		e.c.m.fillErrors.Inc()
		e.c.log.Warn("chunk fill failed", "key", e.key, "chunk", i, "err", err)
		return
	}
	e.c.m.fillSeconds.WithLabelValues(st.src.Name()).Observe(time.Since(start).Seconds())
	if call.pass == nil && e.key.Verifiable() {
		// The chunk is still in buf: hash it from there when it is next in line.
		e.c.advanceHash(e, int64(i)*e.c.opts.ChunkSize, gen, buf[:n])
	}
}

// fetch reads chunk i into buf from the first of the plan's sources that
// has it, and reports which.
func (e *entry) fetch(ctx context.Context, i int, p Plan, buf []byte, call *fillCall) (int, step, string, error) {
	cs := e.c.opts.ChunkSize
	off := int64(i) * cs
	var errs []error
	for _, st := range p.steps() {
		s := st.src
		e.mu.Lock()
		size := e.size
		e.mu.Unlock()
		want := cs
		if size >= 0 {
			if off >= size {
				return 0, step{}, "", fmt.Errorf("chunk %d beyond end of %d-byte blob", i, size)
			}
			want = min(cs, size-off)
		}
		if call != nil && (st.role == roleOrigin || st.role == roleLocal && p.Peers == nil) {
			call.originOnce.Do(func() { close(call.atOrigin) })
		}
		var rc io.ReadCloser
		var total int64
		var err error
		if sw := p.swarm(e.key); sw != nil && st.role == rolePeers {
			var sh blob.Share
			sh, err = sw.FetchShared(ctx, e.key, off, want)
			switch {
			case err == nil && sh.Body == nil && sh.Gathering != nil && call != nil:
				return e.speculate(ctx, i, p, sw, sh.Gathering, buf, call)
			case err == nil && sh.Body == nil:
				// Still gathering, inside a fill that already speculated:
				// the origin is next.
				err = fmt.Errorf("%s: %w (nodes pulling it not known yet)", e.key, blob.ErrNotFound)
			}
			rc, total = sh.Body, sh.Size
		} else {
			rc, total, err = s.Fetch(ctx, e.key, off, want)
		}
		if err != nil {
			if !errors.Is(err, blob.ErrNotFound) {
				errs = append(errs, fmt.Errorf("%s: %w", s.Name(), err))
				if ctx.Err() == nil { // an abandoned fetch (see speculate) is no source error
					e.c.m.sourceErrors.WithLabelValues(s.Name()).Inc()
				}
			}
			continue
		}
		if size < 0 {
			if total < 0 {
				rc.Close()
				errs = append(errs, fmt.Errorf("%s: size unknown", s.Name()))
				continue
			}
			if err := e.learnSize(total); err != nil {
				rc.Close()
				return 0, step{}, "", err
			}
			size = total
			want = min(cs, size-off)
		} else if total >= 0 && total != size {
			rc.Close()
			errs = append(errs, fmt.Errorf("%s: size %d, expected %d", s.Name(), total, size))
			e.c.m.sourceErrors.WithLabelValues(s.Name()).Inc()
			continue
		}
		n, err := io.ReadFull(rc, buf[:want])
		origin := ""
		if a, ok := rc.(blob.Attributed); ok {
			origin = a.Origin()
		}
		rc.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: read chunk %d (%d of %d bytes): %w", s.Name(), i, n, want, err))
			if ctx.Err() == nil {
				e.c.m.sourceErrors.WithLabelValues(s.Name()).Inc()
			}
			continue
		}
		if b, ok := s.(blob.Blamer); ok && origin != "" {
			e.mu.Lock()
			if e.blamers == nil {
				e.blamers = map[string]blob.Blamer{}
			}
			e.blamers[s.Name()] = b
			e.mu.Unlock()
		}
		if st.role.trusted() && total >= 0 {
			e.mu.Lock()
			if e.size == total {
				e.sizeTrusted = true
			}
			e.mu.Unlock()
		}
		e.c.m.fetched.WithLabelValues(s.Name()).Add(float64(n))
		return n, st, origin, nil
	}
	if len(errs) == 0 {
		return 0, step{}, "", fmt.Errorf("%s chunk %d: %w (no source has it)", e.key, i, blob.ErrNotFound)
	}
	return 0, step{}, "", fmt.Errorf("%s chunk %d: %w", e.key, i, errors.Join(errs...))
}

func (e *entry) learnSize(size int64) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.size >= 0 {
		if e.size != size {
			return fmt.Errorf("source reports size %d, cache has %d", size, e.size)
		}
		return nil
	}
	if err := e.c.checkSize(size); err != nil {
		return err
	}
	e.setSize(size)
	return nil
}

// store writes a fetched chunk. When the cache cannot make room the bytes are
// handed to the waiting readers instead (pass).
func (e *entry) store(i int, gen uint64, data []byte, st step, origin string) ([]byte, error) {
	if len(data) == 0 {
		return nil, nil // an empty blob has no chunks
	}
	for try := 0; try < 3; try++ {
		epoch := e.c.spaceEpoch.Load()
		pass, err := e.storeOnce(i, gen, data, st, origin)
		if !isDiskFull(err) {
			return pass, err
		}
		// The filesystem is fuller than --cache-size assumed (other files,
		// a smaller disk): like reaching the bound, make room from blobs
		// nobody reads, else hand the bytes over without storing them.
		e.c.diskFull(err)
		if !e.c.makeSpace(int64(len(data)), e, epoch) {
			break
		}
	}
	e.c.m.passthrough.Inc()
	return append([]byte(nil), data...), nil
}

func (e *entry) storeOnce(i int, gen uint64, data []byte, st step, origin string) ([]byte, error) {
	if !e.c.reserve(int64(len(data)), e) {
		e.c.m.passthrough.Inc()
		return append([]byte(nil), data...), nil
	}
	e.mu.Lock()
	if e.gone || e.gen != gen || i >= len(e.states) {
		// Evicted or reset since the fetch began: the waiting readers get
		// the bytes; a reset's readers retry (ReadAt) on their own.
		e.mu.Unlock()
		e.c.used.Add(-int64(len(data)))
		return append([]byte(nil), data...), nil
	}
	if err := e.createFilesLocked(); err != nil {
		e.mu.Unlock()
		e.c.used.Add(-int64(len(data)))
		return nil, fmt.Errorf("create cache files for %s: %w", e.key, err)
	}
	f := e.f
	e.mu.Unlock()
	if err := e.writeAt(f, data, int64(i)*e.c.opts.ChunkSize); err != nil {
		// Give back what the partial write took: the chunk is absent, so
		// no reader is told its bytes are there.
		punchHole(f, int64(i)*e.c.opts.ChunkSize, int64(len(data)))
		e.c.used.Add(-int64(len(data)))
		return nil, fmt.Errorf("write %s chunk %d: %w", e.key, i, err)
	}
	state := stateUntrusted
	if st.role.trusted() || !e.key.Verifiable() {
		state = stateTrusted
	}
	e.mu.Lock()
	if e.gone || e.gen != gen || i >= len(e.states) {
		e.mu.Unlock()
		e.c.used.Add(-int64(len(data)))
		return append([]byte(nil), data...), nil
	}
	if e.states[i] != stateAbsent {
		e.mu.Unlock()
		e.c.used.Add(-int64(len(data)))
		return nil, nil
	}
	first := !e.announced
	e.announced = true
	e.states[i] = state
	e.markCheckedLocked(i) // bytes written this run
	e.nPresent++
	e.present += int64(len(data))
	e.dirtyIdx = append(e.dirtyIdx, i)
	if origin != "" {
		if e.origins == nil {
			e.origins = map[int]servedBy{}
		}
		e.origins[i] = servedBy{source: st.src.Name(), peer: origin}
	}
	e.mu.Unlock()
	e.c.markDirty(e)
	if first && e.key.Verifiable() {
		e.c.notify(e.key, true)
	}
	return nil, nil
}

// advanceHash feeds newly contiguous chunks to the blob's running hash and,
// once every byte was hashed, verifies the blob. Concurrent callers never
// wait: whoever holds the hash lock picks up their chunks. data, when not
// nil, holds the bytes at off that the caller just stored (of generation gen);
// once hashed, its buffer (up to its capacity) is the scratch space for
// chunks read back from the file, so hashing needs no buffer of its own.
func (c *Cache) advanceHash(e *entry, off int64, gen uint64, data []byte) {
	scratch := data[:cap(data)]
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
				e.hasher.Write(data)
				e.noteSumLocked(int(off/c.opts.ChunkSize), nChunks, chunkSum(data))
				e.hashed += int64(len(data))
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
// Chunks read back from the file (their fills finished out of order or
// while another fill was hashing) are read whole, one pread each, into
// scratch, a finished fill's chunk buffer. Without one (re-verification of
// complete blobs at start, one goroutine per blob) they are read through a
// small buffer, so a restart with many such blobs does not hold a chunk
// buffer for each.
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
		f, err := e.filesLocked()
		off, n, nChunks := e.hashed, e.chunkLen(i), len(e.states)
		e.mu.Unlock()
		if err != nil {
			return false, err
		}
		if int64(cap(scratch)) >= n {
			b := scratch[:n]
			if _, err := f.ReadAt(b, off); err != nil {
				return false, err
			}
			e.hasher.Write(b)
			e.noteSumLocked(i, nChunks, chunkSum(b))
		} else {
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
			e.f.Close()
			e.bm.Close()
			e.f, e.bm = nil, nil
		}
		e.onDisk = false
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
