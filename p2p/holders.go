package p2p

import (
	"fmt"
	"sync"

	"github.com/peerd-project/peerd/blob"
)

// holders tracks which of the node's stores hold each blob. A blob is
// advertised while at least one store holds it: the cache and containerd
// may hold the same blob, and neither may withdraw it while the other still
// serves it.
type holders struct {
	adv   *advertiser[blob.Key]
	mu    sync.Mutex
	names []string            // store names; a store's bit is its index
	held  map[blob.Key]uint32 // bit i set: store i holds the blob
}

// maxStores bounds the stores one node announces for (one bit each).
const maxStores = 32

func newHolders(adv *advertiser[blob.Key]) *holders {
	return &holders{adv: adv, held: map[blob.Key]uint32{}}
}

// Announcer returns the blob.Announcer of the node's store called name (the
// same name gives the same announcer).
func (n *Node) Announcer(name string) blob.Announcer { return n.holders.store(name) }

func (h *holders) store(name string) *holder {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, s := range h.names {
		if s == name {
			return &holder{h: h, bit: 1 << i}
		}
	}
	if len(h.names) == maxStores {
		panic(fmt.Sprintf("p2p: more than %d stores announce blobs", maxStores))
	}
	h.names = append(h.names, name)
	return &holder{h: h, bit: 1 << (len(h.names) - 1)}
}

// holder is one store's announcer.
type holder struct {
	h   *holders
	bit uint32
}

var _ blob.Announcer = (*holder)(nil)

// Holding advertises the keys the store now holds (digests only).
func (s *holder) Holding(keys ...blob.Key) {
	h := s.h
	for _, k := range keys {
		if !k.Verifiable() {
			continue
		}
		h.mu.Lock()
		was := h.held[k]
		h.held[k] = was | s.bit
		h.mu.Unlock()
		if was == 0 {
			h.adv.add(k)
		}
	}
}

// Dropped withdraws the keys no other store holds.
func (s *holder) Dropped(keys ...blob.Key) {
	h := s.h
	for _, k := range keys {
		h.mu.Lock()
		was, ok := h.held[k]
		left := was &^ s.bit
		if ok && left == 0 {
			delete(h.held, k)
		} else if ok {
			h.held[k] = left
		}
		h.mu.Unlock()
		if ok && was != 0 && left == 0 {
			h.adv.remove(k)
		}
	}
}
