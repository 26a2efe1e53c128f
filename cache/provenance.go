package cache

import (
	"github.com/peerd-project/peerd/transfer"
)

// Served reports the bytes the handle's reads returned, by where they came
// from: the cache (present when the handle opened), or the source that
// fetched them since (including read-ahead fills for this reader).
func (h *Handle) Served() transfer.Bytes {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.served
}

// Mark is the point from which a handle counts chunks as fetched rather
// than cached. It holds no source (no credentials), so a face may keep it
// after the handle closed.
type Mark struct {
	e   *entry
	seq uint64
}

// Mark is h's counting point (see CountSince).
func (h *Handle) Mark() Mark {
	h.mu.Lock()
	defer h.mu.Unlock()
	return Mark{h.e, h.openSeq}
}

// CountSince makes h count the chunks that landed since m as fetched, not
// cached: a face that learned a blob's size with one handle (fetching its
// first chunk) and reads it with another. It has no effect when m is of
// another incarnation of the blob's entry, or zero.
func (h *Handle) CountSince(m Mark) {
	if m.e != h.e {
		return
	}
	h.mu.Lock()
	h.openSeq = min(h.openSeq, m.seq)
	h.mu.Unlock()
}

// account adds bytes [off, off+n) the handle returned to its tally.
func (h *Handle) account(off, n int64) {
	if n <= 0 {
		return
	}
	cs := h.c.opts.ChunkSize
	e := h.e
	h.mu.Lock()
	since := h.openSeq
	h.mu.Unlock()
	var add transfer.Bytes
	e.mu.Lock()
	for pos, end := off, off+n; pos < end; {
		i := int(pos / cs)
		next := min(int64(i+1)*cs, end)
		b := next - pos
		var f uint64
		if i < len(e.from) {
			f = e.from[i]
		}
		switch {
		case f>>2 <= since:
			add.Cache += b
		case role(f&3) == roleLocal:
			add.Containerd += b
		case role(f&3) == rolePeers:
			add.Peers += b
		default:
			add.Origin += b
		}
		pos = next
	}
	e.mu.Unlock()
	h.mu.Lock()
	h.served.Add(add)
	h.mu.Unlock()
}
