package cache

import (
	"container/list"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/peerd-project/peerd/blob"
)

// load rebuilds the index from disk.
func (c *Cache) load() error {
	var verify []*entry
	for _, alg := range []string{blob.AlgSHA256, blob.AlgURL} {
		root := filepath.Join(c.opts.Dir, "blobs", alg)
		des, err := os.ReadDir(root)
		if err != nil {
			return fmt.Errorf("cache: read %s: %w", root, err)
		}
		for _, de := range des {
			dir := filepath.Join(root, de.Name())
			if strings.Contains(de.Name(), retiredSuffix) {
				os.RemoveAll(dir) // evicted; its delete did not finish before a crash
				continue
			}
			k, err := blob.ParseKey(alg + ":" + de.Name())
			if err != nil || !de.IsDir() {
				c.log.Warn("removing unexpected entry in cache", "path", dir)
				os.RemoveAll(dir)
				continue
			}
			e, err := c.loadEntry(k, dir)
			if err != nil {
				c.log.Warn("dropping unreadable cached blob", "key", k, "err", err)
				os.RemoveAll(dir)
				continue
			}
			c.blobs[k] = e
			e.elem = c.lru.PushBack(e)
			c.used.Add(e.present)
			if e.complete() && !e.verified && k.Verifiable() {
				verify = append(verify, e)
			}
		}
	}
	// Oldest first at the back.
	sortLRU(c.lru)
	for _, e := range verify {
		e := e
		c.ref(e)
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			defer c.unref(e)
			c.advanceHash(e, 0, 0, nil, nil)
		}()
	}
	c.log.Info("cache loaded", "dir", c.opts.Dir, "blobs", len(c.blobs), "bytes", c.used.Load(), "limit", c.opts.MaxBytes)
	return nil
}

func sortLRU(l *list.List) {
	var es []*entry
	for el := l.Front(); el != nil; el = el.Next() {
		es = append(es, el.Value.(*entry))
	}
	// insertion into a fresh order by lastUse descending
	for i := 1; i < len(es); i++ {
		for j := i; j > 0 && es[j].lastUse.After(es[j-1].lastUse); j-- {
			es[j], es[j-1] = es[j-1], es[j]
		}
	}
	l.Init()
	for _, e := range es {
		e.elem = l.PushBack(e)
	}
}

func (c *Cache) loadEntry(k blob.Key, dir string) (*entry, error) {
	m, err := readMeta(dir)
	if err != nil {
		return nil, err
	}
	if m.Key != k {
		return nil, fmt.Errorf("meta names %s", m.Key)
	}
	if m.ChunkSize != c.opts.ChunkSize {
		return nil, fmt.Errorf("chunk size changed from %d to %d", m.ChunkSize, c.opts.ChunkSize)
	}
	e := newEntry(c, k, dir)
	e.created = m.Created
	if err := c.checkSize(m.Size); err != nil {
		return nil, fmt.Errorf("meta: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "data"), os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil || st.Size() != m.Size {
		f.Close()
		return nil, fmt.Errorf("data file size %v, want %d", st.Size(), m.Size)
	}
	bm, err := os.OpenFile(filepath.Join(dir, "chunks"), os.O_RDWR, 0)
	if err != nil {
		f.Close()
		return nil, err
	}
	n := numChunks(m.Size, c.opts.ChunkSize)
	states := make([]byte, n)
	if _, err := io.ReadFull(bm, states); err != nil && n > 0 {
		f.Close()
		bm.Close()
		return nil, fmt.Errorf("chunk map: %w", err)
	}
	// The files are closed again: an entry opens them on first use.
	f.Close()
	bm.Close()
	e.onDisk = true
	e.setSize(m.Size)
	for i, s := range states {
		switch s {
		case stateAbsent:
		case stateTrusted, stateUntrusted:
			e.states[i] = s
			// A trusted chunk was stored only after its source's size matched.
			e.sizeTrusted = e.sizeTrusted || s == stateTrusted
			e.nPresent++
			e.present += e.chunkLen(i)
		default:
			return nil, fmt.Errorf("chunk map: bad state %d", s)
		}
	}
	if m.Verified && e.complete() {
		if sums, err := readSums(dir, n); err == nil {
			// Checked chunk by chunk on first read (check.go).
			e.verified, e.sums, e.checked, e.unchecked = true, sums, make([]bool, n), n
		} else {
			c.log.Info("verified blob has no chunk sums; verifying it again", "key", k, "err", err)
		}
	}
	e.sizeTrusted = e.sizeTrusted || e.verified
	e.announced = e.present > 0 // the p2p layer advertises everything List returns at start
	e.lastUse = st.ModTime()
	return e, nil
}
