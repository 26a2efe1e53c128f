package cache

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"
)

// reserve makes room for n more bytes, evicting unreferenced blobs other than
// self. It reports false when the bound cannot be met.
func (c *Cache) reserve(n int64, self *entry) bool {
	c.mu.Lock()
	var victims []*entry
	if c.used.Load()+n > c.opts.MaxBytes {
		victims = c.evictLocked(n, self)
	}
	ok := c.used.Load()+n <= c.opts.MaxBytes
	if ok {
		c.used.Add(n)
	}
	c.mu.Unlock()
	c.destroy(victims)
	return ok
}

// makeSpace answers a write of n bytes the filesystem refused at space
// epoch epoch: it reports true when the write may be tried again, because
// blobs were evicted since (by this call or a concurrent one, which it waits
// for).
func (c *Cache) makeSpace(n int64, self *entry, epoch uint64) bool {
	c.spaceMu.Lock()
	defer c.spaceMu.Unlock()
	if c.spaceEpoch.Load() != epoch {
		return true
	}
	if !c.evictForSpace(n, self) {
		return false
	}
	c.spaceEpoch.Add(1)
	return true
}

// evictForSpace evicts least recently used blobs that nobody reads, other
// than self, until they held at least 2n bytes (the filesystem refused a
// write of n bytes). It reports whether it evicted anything.
func (c *Cache) evictForSpace(n int64, self *entry) bool {
	c.mu.Lock()
	var victims []*entry
	var freed int64
	for el := c.lru.Back(); el != nil && freed < 2*n; {
		e := el.Value.(*entry)
		prev := el.Prev()
		if e.refs == 0 && e != self {
			e.mu.Lock()
			freed += e.present
			e.mu.Unlock()
			c.retireLocked(e)
			victims = append(victims, e)
		}
		el = prev
	}
	c.mu.Unlock()
	c.destroy(victims)
	return len(victims) > 0
}

// diskFull counts a write the filesystem refused for want of space and
// says so in the log, at most once a minute.
func (c *Cache) diskFull(err error) {
	c.m.diskFull.Inc()
	now := time.Now().UnixNano()
	last := c.diskFullLog.Load()
	if now-last < int64(time.Minute) || !c.diskFullLog.CompareAndSwap(last, now) {
		return
	}
	c.log.Warn("cache disk is full: evicting blobs nobody reads, else serving without storing", "dir", c.opts.Dir, "used", c.used.Load(), "limit", c.opts.MaxBytes, "err", err)
}

// evictLocked takes least recently used, unreferenced blobs out of the index
// until n more bytes fit, and returns them for destroy. c.mu is held.
func (c *Cache) evictLocked(n int64, self *entry) []*entry {
	var victims []*entry
	for el := c.lru.Back(); el != nil && c.used.Load()+n > c.opts.MaxBytes; {
		e := el.Value.(*entry)
		prev := el.Prev()
		if e.refs == 0 && e != self {
			c.retireLocked(e)
			victims = append(victims, e)
		}
		el = prev
	}
	return victims
}

// retireLocked takes e out of the index and moves its folder aside at once
// (c.mu held). A new entry for the same key, which getEntry may create as
// soon as c.mu is free, then lays out a fresh folder instead of opening the
// files that e's last flush and destroy still use: it would have shared
// (and truncated) them, and lost them to destroy's delete. destroy deletes
// the moved folder; a crash before that leaves a name load removes.
func (c *Cache) retireLocked(e *entry) {
	delete(c.blobs, e.key)
	c.lru.Remove(e.elem)
	e.mu.Lock()
	defer e.mu.Unlock()
	c.used.Add(-e.present)
	gone := fmt.Sprintf("%s%s%d", e.dir, retiredSuffix, c.retired.Add(1))
	switch err := os.Rename(e.dir, gone); {
	case err == nil:
		e.dir = gone
	case !errors.Is(err, fs.ErrNotExist): // no folder yet: nothing to move
		c.log.Warn("cannot move an evicted blob's folder aside; deleting it now", "key", e.key, "err", err)
		os.RemoveAll(e.dir)
	}
}

// retiredSuffix marks a retired entry's folder (see retireLocked).
const retiredSuffix = ".retired-"

// destroy deletes evicted blobs' files (outside c.mu) and tells the announcer.
func (c *Cache) destroy(victims []*entry) {
	for _, e := range victims {
		had := e.destroy()
		c.m.evictions.Inc()
		c.log.Debug("evicted blob", "key", e.key)
		if had && e.key.Verifiable() {
			c.notify(e.key, false)
		}
	}
}
