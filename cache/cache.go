// Package cache is peerd's one content cache. Every face (the Overlaybd
// /blobs proxy, the OCI mirror, the FUSE mount, the peer data plane) reads
// through it. A blob is stored in whole chunks, filled on demand from the
// sources of the reader's Plan, verified against its digest once complete, and
// evicted least-recently-used first when the cache outgrows its bound.
package cache

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/transfer"
	"github.com/prometheus/client_golang/prometheus"
)

// Options configure a Cache.
type Options struct {
	// Dir is the cache root; created if missing.
	Dir string
	// ChunkSize is the unit of fill and of presence; default 1 MiB.
	ChunkSize int64
	// MaxBytes bounds the bytes held on disk; 0 means 10 GiB.
	MaxBytes int64
	// FillTimeout bounds one chunk fill across all sources; default 60s.
	FillTimeout time.Duration
	// ReadAhead is how many chunks ahead a sequential reader fills; default 8.
	ReadAhead int
	// BackgroundFills bounds concurrent read-ahead fills; default 16.
	BackgroundFills int
	// FlushInterval is how often filled chunks are made durable; default 1s.
	FlushInterval time.Duration
	// BufferedWrites makes every write go through the page cache; by
	// default a blob filled from nothing is written with direct I/O until it
	// verifies (direct.go).
	BufferedWrites bool
	// HeldChunks bounds the chunk buffers fills keep in memory for the
	// readers and hash that come next (held.go); default 8, negative: none.
	HeldChunks int
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	// Announcer hears when the cache starts and stops holding a blob (the
	// p2p node advertises and withdraws it); nil announces nothing.
	Announcer blob.Announcer
}

// Cache is safe for concurrent use.
type Cache struct {
	opts Options
	log  *slog.Logger
	m    *metrics

	mu    sync.Mutex // guards blobs, lru, entry.refs and entry.elem
	blobs map[blob.Key]*entry
	lru   *list.List // front = most recently used

	used atomic.Int64 // bytes of present chunks, including reservations

	bg         chan struct{} // semaphore for background fills
	direct     atomic.Bool   // blobs filled from nothing use direct I/O (direct.go)
	heldMu     sync.Mutex    // guards held; taken before any entry.mu
	held       *list.List    // held chunks, oldest first (held.go)
	dirtyMu    sync.Mutex
	dirty      map[*entry]struct{}
	announceMu sync.RWMutex
	announcer  blob.Announcer

	stop    chan struct{}
	stopped chan struct{}
	wg      sync.WaitGroup // background goroutines that touch entries
	retired atomic.Uint64  // names retired folders (retireLocked)
	// diskFullLog is when the last disk-full warning was logged (UnixNano).
	diskFullLog atomic.Int64
	// spaceMu serialises evictions for a full disk; spaceEpoch counts them,
	// so a write that failed before one finished is tried again.
	spaceMu    sync.Mutex
	spaceEpoch atomic.Uint64
	// life bounds every fill and prefetch: Close ends it, so a source that
	// stopped answering cannot hold shutdown until the fill's deadline.
	life    context.Context
	endLife context.CancelFunc
}

// Info describes what the cache holds of one blob.
type Info struct {
	Key      blob.Key
	Size     int64 // -1 if not yet known
	Present  int64 // bytes of present chunks
	Complete bool
	Verified bool
	ModTime  time.Time
	// Readers counts the holders of the blob now (open handles, fills).
	Readers int
	// LastAccess is when the blob was last opened or released.
	LastAccess time.Time
	// Filled counts the bytes that landed since the start, by source, and
	// Peers names the peers whose bytes landed (a bounded few).
	Filled transfer.Bytes
	Peers  []string
}

// Open loads the cache at opts.Dir, dropping anything a crash left half-written.
func Open(opts Options) (*Cache, error) {
	if opts.Dir == "" {
		return nil, errors.New("cache: empty Dir")
	}
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = 1 << 20
	}
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = 10 << 30
	}
	if opts.FillTimeout <= 0 {
		opts.FillTimeout = 60 * time.Second
	}
	if opts.ReadAhead < 0 {
		opts.ReadAhead = 0
	} else if opts.ReadAhead == 0 {
		opts.ReadAhead = 8
	}
	if opts.BackgroundFills <= 0 {
		opts.BackgroundFills = 16
	}
	if opts.FlushInterval <= 0 {
		opts.FlushInterval = time.Second
	}
	if opts.HeldChunks == 0 {
		opts.HeldChunks = 8
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	c := &Cache{
		opts:      opts,
		log:       opts.Logger.With("component", "cache"),
		blobs:     map[blob.Key]*entry{},
		lru:       list.New(),
		held:      list.New(),
		bg:        make(chan struct{}, opts.BackgroundFills),
		dirty:     map[*entry]struct{}{},
		announcer: opts.Announcer,
		stop:      make(chan struct{}),
		stopped:   make(chan struct{}),
	}
	c.life, c.endLife = context.WithCancel(context.Background())
	c.direct.Store(!opts.BufferedWrites && opts.ChunkSize%directAlign == 0)
	c.m = newMetrics(c, opts.Registerer)
	for _, alg := range []string{blob.AlgSHA256, blob.AlgURL} {
		if err := os.MkdirAll(filepath.Join(opts.Dir, "blobs", alg), 0o700); err != nil {
			return nil, fmt.Errorf("cache: create %s: %w", opts.Dir, err)
		}
	}
	if err := c.load(); err != nil {
		return nil, err
	}
	go c.flusher()
	if c.used.Load() > c.opts.MaxBytes {
		c.mu.Lock()
		victims := c.evictLocked(0, nil)
		c.mu.Unlock()
		c.destroy(victims)
	}
	return c, nil
}

// SetAnnouncer replaces the announcer (the p2p node starts after the cache).
func (c *Cache) SetAnnouncer(a blob.Announcer) {
	c.announceMu.Lock()
	c.announcer = a
	c.announceMu.Unlock()
}

func (c *Cache) notify(k blob.Key, added bool) {
	c.announceMu.RLock()
	a := c.announcer
	c.announceMu.RUnlock()
	if a == nil {
		return
	}
	if added {
		a.Holding(k)
	} else {
		a.Dropped(k)
	}
}

// ChunkSize is the cache's fill unit.
func (c *Cache) ChunkSize() int64 { return c.opts.ChunkSize }

// Used is the number of bytes the cache holds.
func (c *Cache) Used() int64 { return c.used.Load() }

// Close flushes what is pending and stops background work. Open handles stay
// readable until closed but start no new fills.
func (c *Cache) Close() error {
	select {
	case <-c.stop:
		return nil
	default:
	}
	close(c.stop)
	c.endLife()
	<-c.stopped
	c.wg.Wait()
	c.flushAll()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.blobs {
		e.closeFiles()
	}
	return nil
}

func (c *Cache) closing() bool {
	select {
	case <-c.stop:
		return true
	default:
		return false
	}
}

// getEntry returns the entry for k, creating an empty one, and takes a ref.
func (c *Cache) getEntry(k blob.Key) *entry {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.blobs[k]
	if !ok {
		e = newEntry(c, k, blobDir(c.opts.Dir, k))
		e.created = time.Now()
		c.blobs[k] = e
		e.elem = c.lru.PushFront(e)
	} else {
		c.lru.MoveToFront(e.elem)
	}
	e.refs++
	e.lastUse = time.Now()
	return e
}

func (c *Cache) ref(e *entry) {
	c.mu.Lock()
	e.refs++
	c.mu.Unlock()
}

func (c *Cache) unref(e *entry) {
	c.mu.Lock()
	e.refs--
	drop := e.refs == 0 && !e.hasFiles() && c.blobs[e.key] == e
	withdraw := false
	if e.refs == 0 && !drop {
		e.closeIdleFiles()
	}
	if drop {
		// Nothing was ever stored: forget the empty entry.
		delete(c.blobs, e.key)
		c.lru.Remove(e.elem)
		e.mu.Lock()
		withdraw, e.announced = e.announced, false
		e.mu.Unlock()
	}
	c.mu.Unlock()
	if withdraw && e.key.Verifiable() {
		// It was announced when its pull started, and the pull failed.
		c.notify(e.key, false)
	}
}

// Stat reports what the cache holds of k.
func (c *Cache) Stat(k blob.Key) (Info, bool) {
	c.mu.Lock()
	e, ok := c.blobs[k]
	var refs int
	var last time.Time
	if ok {
		refs, last = e.refs, e.lastUse
	}
	c.mu.Unlock()
	if !ok {
		return Info{}, false
	}
	i := e.info()
	i.Readers, i.LastAccess = refs, last
	return i, i.Size >= 0
}

// ChunkMap returns one byte per chunk of k: '.' absent, 'p' from a peer and
// not re-servable until the blob verified, 'v' present and servable.
func (c *Cache) ChunkMap(k blob.Key) (string, bool) {
	c.mu.Lock()
	e, ok := c.blobs[k]
	c.mu.Unlock()
	if !ok {
		return "", false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	b := make([]byte, len(e.states))
	for i, s := range e.states {
		switch {
		case s == stateAbsent:
			b[i] = '.'
		case s == stateUntrusted && !e.verified:
			b[i] = 'p'
		default:
			b[i] = 'v'
		}
	}
	return string(b), e.size >= 0
}

// List reports every blob the cache holds any bytes of.
func (c *Cache) List() []Info {
	type held struct {
		e    *entry
		refs int
		last time.Time
	}
	c.mu.Lock()
	es := make([]held, 0, len(c.blobs))
	for _, e := range c.blobs {
		es = append(es, held{e, e.refs, e.lastUse})
	}
	c.mu.Unlock()
	out := make([]Info, 0, len(es))
	for _, h := range es {
		if i := h.e.info(); i.Present > 0 {
			i.Readers, i.LastAccess = h.refs, h.last
			out = append(out, i)
		}
	}
	return out
}

// Remove drops a blob from the cache unless it is being read.
func (c *Cache) Remove(k blob.Key) bool {
	c.mu.Lock()
	e, ok := c.blobs[k]
	if !ok || e.refs > 0 {
		c.mu.Unlock()
		return false
	}
	c.retireLocked(e)
	c.mu.Unlock()
	if e.destroy() && k.Verifiable() {
		c.notify(k, false)
	}
	return true
}

func (c *Cache) markDirty(e *entry) {
	c.dirtyMu.Lock()
	c.dirty[e] = struct{}{}
	c.dirtyMu.Unlock()
}

func (c *Cache) flusher() {
	defer close(c.stopped)
	t := time.NewTicker(c.opts.FlushInterval)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
			c.flushAll()
			c.dropStaleHeld(time.Now().Add(-heldFor))
		}
	}
}

func (c *Cache) flushAll() {
	c.dirtyMu.Lock()
	es := c.dirty
	c.dirty = map[*entry]struct{}{}
	c.dirtyMu.Unlock()
	for e := range es {
		if err := e.flush(); isDiskFull(err) {
			c.diskFull(err)
		} else if err != nil {
			c.log.Error("flush cache chunk map", "key", e.key, "err", err)
		}
		// Its last user may have left while chunks were still to flush.
		c.mu.Lock()
		if e.refs == 0 {
			e.closeIdleFiles()
		}
		c.mu.Unlock()
	}
}
