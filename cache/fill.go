package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"time"

	"github.com/peerd-project/peerd/blob"
)

// ensure makes chunk i present, fetching it under plan p unless another
// caller already is. It returns pass != nil when the chunk could not be
// stored and its bytes are handed over directly.
func (e *entry) ensure(ctx context.Context, i int, p Plan, background bool) (pass []byte, err error) {
	call, err := e.begin(i, p, background)
	if call == nil || err != nil {
		return nil, err
	}
	select {
	case <-call.done:
		return call.pass, call.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// ensureInto is ensure for a reader that needs bytes [from, from+len(dst))
// of chunk i: when they arrive before the rest of the chunk, they are
// copied into dst at once (copied), so a reader of a blob's header does
// not wait for a whole chunk from a slow origin.
func (e *entry) ensureInto(ctx context.Context, i int, p Plan, dst []byte, from int64) (copied bool, pass []byte, err error) {
	call, err := e.begin(i, p, false)
	if call == nil || err != nil {
		return false, nil, err
	}
	for {
		ok, grew := call.copyIfIn(dst, from)
		if ok {
			return true, nil, nil
		}
		if grew == nil { // the buffer is gone: the fill is ending
			grew = call.done
		}
		select {
		case <-call.done:
			return false, call.pass, call.err
		case <-grew:
		case <-ctx.Done():
			return false, nil, ctx.Err()
		}
	}
}

// streamPrefix is ensure for a writer of bytes [from, to) of chunk i: the
// bytes are written to w as the fill receives them, all but the chunk's last
// byte, so a client's first byte of a cold chunk does not wait for the whole
// chunk to arrive and be stored. It returns how many bytes it wrote; the
// caller writes the rest once the chunk is present (ensure).
func (e *entry) streamPrefix(ctx context.Context, i int, p Plan, w io.Writer, from, to int64) (int64, error) {
	call, err := e.begin(i, p, false)
	if call == nil || err != nil {
		return 0, err
	}
	var bp *[]byte
	defer func() {
		if bp != nil {
			streamPool.Put(bp)
		}
	}()
	written := int64(0)
	for from+written < to {
		if bp == nil {
			bp = streamPool.Get().(*[]byte)
		}
		n, grew := call.copyAvail(*bp, from+written, to)
		if n > 0 {
			m, err := w.Write((*bp)[:n])
			written += int64(m)
			if err != nil {
				return written, err
			}
			if f, ok := w.(flusher); ok {
				f.Flush()
			}
			continue
		}
		if grew == nil {
			return written, nil
		}
		select {
		case <-call.done:
			return written, nil
		case <-grew:
		case <-ctx.Done():
			return written, ctx.Err()
		}
	}
	return written, nil
}

// flusher is a writer that buffers and can be told to send what it holds
// (an HTTP response).
type flusher interface{ Flush() }

// streamPool holds the copies streamPrefix makes of a fill's bytes: the
// fill's own buffer may be reused once it retires, so bytes leave it only
// by copy, a piece at a time.
var streamPool = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// begin starts filling chunk i under plan p unless it is present (nil) or
// another caller fills it already (that fill).
func (e *entry) begin(i int, p Plan, background bool) (*fillCall, error) {
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
	return call, nil
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

// chunkBuf returns a pooled buffer of at least cs bytes, aligned for direct
// I/O; put it back in bufPool.
func chunkBuf(cs int64) *[]byte {
	bp := bufPool.Get().(*[]byte)
	if int64(cap(*bp)) < cs {
		*bp = alignedBuf(cs)
	}
	*bp = (*bp)[:cap(*bp)]
	return bp
}

// fill fetches chunk i (or, with the size unknown, chunk 0 and the size).
func (e *entry) fill(i int, p Plan, call *fillCall) {
	ctx, cancel := context.WithTimeout(e.c.life, e.c.opts.FillTimeout)
	defer cancel()
	start := time.Now()
	bp := chunkBuf(e.c.opts.ChunkSize)
	var kept *heldChunk // the buffer became the chunk's held copy
	defer func() {
		if kept == nil {
			bufPool.Put(bp)
		} else {
			e.unrefHeld(kept) // the held copy may go from now on
		}
	}()
	buf := (*bp)[:e.c.opts.ChunkSize]
	e.mu.Lock()
	gen := e.gen // bytes fetched before a reset must not land after it
	e.mu.Unlock()
	n, st, origin, err := e.fetch(ctx, i, p, buf, call, call)
	// From here buf is stored, held or used as the hash's scratch space:
	// readers of a prefix read the chunk as stored, like everyone.
	call.retire()
	if err == nil {
		call.pass, err = e.store(i, gen, buf[:n], st, origin)
	}
	if err == nil && call.pass == nil && e.directRead(i) {
		// Written around the page cache: keep the bytes for the readers
		// waiting for them (so before they are woken) and the hash.
		kept = e.c.hold(e, i, gen, bp)
	}
	e.mu.Lock()
	delete(e.inflight, i)
	if err != nil {
		e.failedAt = time.Now()
	} else if call.pass != nil {
		e.noteFromLocked(i, st.role, n) // handed over, not stored: its readers still count its source
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
	if call.pass != nil {
		return
	}
	if e.key.Verifiable() {
		// The chunk is still in buf: hash it from there when it is next in
		// line. A held buffer must not be the hash's scratch space.
		scratch := buf[:cap(buf)]
		if kept != nil {
			scratch = nil
		}
		e.c.advanceHash(e, int64(i)*e.c.opts.ChunkSize, gen, buf[:n], scratch)
	}
}

// fetch reads chunk i into buf from the first of the plan's sources that
// has it, and reports which. pub, when not nil, is told the bytes as they
// arrive (fillCall.publish).
func (e *entry) fetch(ctx context.Context, i int, p Plan, buf []byte, call, pub *fillCall) (int, step, string, error) {
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
				return e.speculate(ctx, i, p, sw, sh, buf, call, pub)
			case err == nil && sh.Body == nil:
				if sh.Release != nil {
					sh.Release()
				}
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
		n, err := readChunk(rc, buf[:want], pub)
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

// readChunk reads len(buf) bytes from rc like io.ReadFull, telling pub
// (when not nil) how many have arrived after each read.
func readChunk(rc io.Reader, buf []byte, pub *fillCall) (int, error) {
	if pub == nil {
		return io.ReadFull(rc, buf)
	}
	n := 0
	for n < len(buf) {
		m, err := rc.Read(buf[n:])
		n += m
		if m > 0 {
			pub.publish(buf, int64(n))
		}
		if err != nil {
			if err == io.EOF {
				if n == len(buf) {
					break
				}
				if n > 0 {
					err = io.ErrUnexpectedEOF
				}
			}
			return n, err
		}
	}
	return n, nil
}

func (e *entry) learnSize(size int64) error {
	e.mu.Lock()
	if e.size >= 0 {
		defer e.mu.Unlock()
		if e.size != size {
			return fmt.Errorf("source reports size %d, cache has %d", size, e.size)
		}
		return nil
	}
	if err := e.c.checkSize(size); err != nil {
		e.mu.Unlock()
		return err
	}
	waited := e.sized != nil
	e.setSize(size)
	e.mu.Unlock()
	if waited {
		// A reader waits for the size (a client's headers): let it run
		// now, so that it waits for the chunk's first bytes when they
		// arrive (fillCall.publish) instead of after the whole chunk.
		runtime.Gosched()
	}
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
	f, df := e.f, e.df
	if !e.directChunkLocked(i) {
		df = nil
	}
	e.mu.Unlock()
	if err := e.writeAt(f, df, data, int64(i)*e.c.opts.ChunkSize); err != nil {
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
	e.noteFromLocked(i, st.role, len(data))
	e.markCheckedLocked(i) // bytes written this run
	e.nPresent++
	e.present += int64(len(data))
	e.dirtyIdx = append(e.dirtyIdx, i)
	if origin != "" {
		if e.origins == nil {
			e.origins = map[int]servedBy{}
		}
		e.origins[i] = servedBy{source: st.src.Name(), peer: origin}
		e.notePeerLocked(origin)
	}
	e.mu.Unlock()
	e.c.markDirty(e)
	if first && e.key.Verifiable() {
		e.c.notify(e.key, true)
	}
	return nil, nil
}
