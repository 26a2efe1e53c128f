package upstream

import (
	"container/list"
	"sync"
	"time"

	"github.com/peerd-project/peerd/blob"
)

// Learned remembers, for a while, the origin a digest was last fetched from
// through a face that names its origin (the /blobs/ proxy), so that faces
// that know only the digest (the FUSE mount) can still reach an origin when
// no peer holds the blob. It lives in memory only: an origin URL may carry a
// signature, which must never reach the disk, a log line or a peer.
type Learned struct {
	mu    sync.Mutex
	ttl   time.Duration
	max   int
	items map[blob.Key]*list.Element
	order *list.List // front = newest
	now   func() time.Time
}

type learnedItem struct {
	key blob.Key
	src blob.Source
	at  time.Time
}

// NewLearned keeps at most max origins, each for ttl.
func NewLearned(max int, ttl time.Duration) *Learned {
	return &Learned{ttl: ttl, max: max, items: map[blob.Key]*list.Element{}, order: list.New(), now: time.Now}
}

// Learn records src as an origin of k. Only digest keys are kept.
func (l *Learned) Learn(k blob.Key, src blob.Source) {
	if l == nil || !k.Verifiable() || src == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if el, ok := l.items[k]; ok {
		it := el.Value.(*learnedItem)
		it.src, it.at = src, l.now()
		l.order.MoveToFront(el)
		return
	}
	l.items[k] = l.order.PushFront(&learnedItem{key: k, src: src, at: l.now()})
	for l.order.Len() > l.max {
		old := l.order.Back()
		delete(l.items, old.Value.(*learnedItem).key)
		l.order.Remove(old)
	}
}

// Origin returns the remembered origin of k if it is still fresh, else nil.
func (l *Learned) Origin(k blob.Key) blob.Source {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	el, ok := l.items[k]
	if !ok {
		return nil
	}
	it := el.Value.(*learnedItem)
	if l.now().Sub(it.at) > l.ttl {
		delete(l.items, k)
		l.order.Remove(el)
		return nil
	}
	return it.src
}
