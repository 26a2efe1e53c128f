package cache

import (
	"container/list"
	"time"
)

// Held chunks: a fill of a blob in direct mode keeps its chunk buffer in
// memory after writing it, so that the reader who is about to ask for the
// chunk, and the blob's hash when the chunk's turn comes, read it from
// there instead of from the disk. The cache holds at most Options.HeldChunks
// of them in all, oldest out first, preferring chunks already hashed; a
// chunk a reader is copying is never dropped under it. What falls out is
// read back from the disk with direct I/O, so the bound costs speed, never
// correctness. A held chunk nobody came for goes after heldFor, so an idle
// node keeps no chunk buffers.

// heldFor is how long a chunk stays held at most: the reader of a fill
// comes for it within the read-ahead window, well inside this.
const heldFor = 2 * time.Second

type heldChunk struct {
	e       *entry
	i       int
	buf     *[]byte // from bufPool; (*buf)[:chunkLen] is the chunk
	refs    int     // readers copying from buf (guarded by e.mu)
	hashed  bool    // the blob's hash has consumed it (guarded by e.mu)
	dropped bool    // out of e.held; buf goes back to the pool at refs 0
	elem    *list.Element
	at      time.Time // when it was held
}

// heldLocked returns chunk i's held copy, or nil. e.mu is held.
func (e *entry) heldLocked(i int) *heldChunk {
	if h := e.held[i]; h != nil && !h.dropped {
		return h
	}
	return nil
}

// refHeld returns chunk i's held copy with a reference the caller gives
// back with unrefHeld, or nil.
func (e *entry) refHeld(i int) *heldChunk {
	e.mu.Lock()
	defer e.mu.Unlock()
	h := e.heldLocked(i)
	if h != nil {
		h.refs++
	}
	return h
}

func (e *entry) unrefHeld(h *heldChunk) {
	e.mu.Lock()
	h.refs--
	free := h.dropped && h.refs == 0
	e.mu.Unlock()
	if free {
		bufPool.Put(h.buf)
	}
}

// dropHeldLocked forgets every held chunk of e (a reset, an eviction, the
// blob leaving direct mode with nobody left to read it). Buffers in use go
// back to the pool when their last reader is done. e.mu is held.
func (e *entry) dropHeldLocked() {
	for i, h := range e.held {
		h.dropped = true
		if h.refs == 0 {
			bufPool.Put(h.buf)
			h.buf = nil
		}
		delete(e.held, i)
	}
}

// hold keeps bp, the buffer chunk i of generation gen was just written
// from, as the chunk's held copy, and returns it with a reference for the
// caller, who goes on reading the buffer (the hash) and gives the
// reference back with unrefHeld. It returns nil when it did not take the
// buffer (the bound is 0, the chunk is no longer current); the caller then
// still owns it.
func (c *Cache) hold(e *entry, i int, gen uint64, bp *[]byte) *heldChunk {
	if c.opts.HeldChunks <= 0 {
		return nil
	}
	c.heldMu.Lock()
	defer c.heldMu.Unlock()
	for c.held.Len() >= c.opts.HeldChunks {
		if !c.dropOldestHeldLocked() {
			return nil
		}
	}
	e.mu.Lock()
	if e.gone || e.gen != gen || e.df == nil || i >= len(e.states) || e.states[i] == stateAbsent || e.held[i] != nil {
		e.mu.Unlock()
		return nil
	}
	h := &heldChunk{e: e, i: i, buf: bp, refs: 1, hashed: !e.key.Verifiable(), at: time.Now()}
	if e.held == nil {
		e.held = map[int]*heldChunk{}
	}
	e.held[i] = h
	e.mu.Unlock()
	h.elem = c.held.PushBack(h)
	return h
}

// dropOldestHeldLocked drops one held chunk: the oldest hashed one nobody
// is copying, else the oldest nobody is copying. It also clears out chunks
// their entry already dropped. c.heldMu is held; it takes entries' e.mu
// (lock order: Cache.heldMu, then entry.mu).
func (c *Cache) dropOldestHeldLocked() bool {
	var fallback *heldChunk
	for el := c.held.Front(); el != nil; {
		next := el.Next()
		h := el.Value.(*heldChunk)
		h.e.mu.Lock()
		switch {
		case h.dropped:
			c.held.Remove(el)
			h.e.mu.Unlock()
			return true
		case h.refs == 0 && h.hashed:
			c.dropHeldOneLocked(h)
			h.e.mu.Unlock()
			return true
		case h.refs == 0 && fallback == nil:
			fallback = h
		}
		h.e.mu.Unlock()
		el = next
	}
	if fallback == nil {
		return false
	}
	fallback.e.mu.Lock()
	defer fallback.e.mu.Unlock()
	if fallback.refs != 0 {
		return false
	}
	if !fallback.dropped {
		c.dropHeldOneLocked(fallback)
	} else {
		c.held.Remove(fallback.elem)
	}
	return true
}

// dropHeldOneLocked removes h from its entry and the cache's list and
// returns its buffer. c.heldMu and h.e.mu are held; h.refs is 0.
func (c *Cache) dropHeldOneLocked(h *heldChunk) {
	delete(h.e.held, h.i)
	h.dropped = true
	c.held.Remove(h.elem)
	bufPool.Put(h.buf)
	h.buf = nil
}

// dropStaleHeld drops the held chunks held since before t that nobody is
// copying.
func (c *Cache) dropStaleHeld(t time.Time) {
	c.heldMu.Lock()
	defer c.heldMu.Unlock()
	for el := c.held.Front(); el != nil; {
		next := el.Next()
		h := el.Value.(*heldChunk)
		if !h.at.Before(t) {
			break // the list is oldest first
		}
		h.e.mu.Lock()
		switch {
		case h.dropped:
			c.held.Remove(el)
		case h.refs == 0:
			c.dropHeldOneLocked(h)
		}
		h.e.mu.Unlock()
		el = next
	}
}

// heldCount is the number of held chunks (tests, the debug page).
func (c *Cache) heldCount() int {
	c.heldMu.Lock()
	defer c.heldMu.Unlock()
	n := 0
	for el := c.held.Front(); el != nil; el = el.Next() {
		h := el.Value.(*heldChunk)
		h.e.mu.Lock()
		if !h.dropped {
			n++
		}
		h.e.mu.Unlock()
	}
	return n
}
