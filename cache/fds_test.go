package cache

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
)

func openFDs(t *testing.T) int {
	t.Helper()
	des, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("skipping: cannot count open files: %v", err)
	}
	return len(des)
}

// A cache loaded from disk holds no file open per blob: a node with many
// cached blobs must not run out of descriptors (and drop blobs it could not
// open) at start.
func TestLoadOpensNoFilePerBlob(t *testing.T) {
	const blobs = 300
	dir := t.TempDir()
	c := open(t, dir, 1<<30, nil, nil)
	src := newFake("upstream", true)
	var keys []blob.Key
	for range blobs {
		data, k := randBlob(t, 1000)
		src.blobs[k] = data
		keys = append(keys, k)
		h := c.Open(k, src.plan())
		readAll(t, h)
		h.Close()
	}
	c.Close()

	before := openFDs(t)
	c2 := open(t, dir, 1<<30, nil, nil)
	defer c2.Close()
	if got := len(c2.List()); got != blobs {
		t.Fatalf("loaded %d blobs, want %d", got, blobs)
	}
	if grew := openFDs(t) - before; grew > 20 {
		t.Fatalf("loading %d blobs opened %d files", blobs, grew)
	}
	// Loaded blobs still read back, from the cache.
	fetches := src.total()
	for _, k := range keys[:10] {
		h := c2.Open(k, src.plan())
		if got := readAll(t, h); !bytes.Equal(got, src.blobs[k]) {
			t.Fatalf("%s: wrong bytes after restart", k)
		}
		h.Close()
	}
	if src.total() != fetches {
		t.Fatalf("reading loaded blobs cost %d fetches", src.total()-fetches)
	}
}

// A partly filled blob loaded from disk goes on filling into its files
// without losing the chunks it has.
func TestLoadedPartialBlobKeepsItsChunks(t *testing.T) {
	dir := t.TempDir()
	open := func() *Cache {
		return Must(Open(Options{Dir: dir, ChunkSize: cs, ReadAhead: -1, FlushInterval: 10 * time.Millisecond}))
	}
	c := open()
	src := newFake("upstream", true)
	data, k := randBlob(t, 3*cs+7)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	p := make([]byte, 10)
	if _, err := h.ReadAt(context.Background(), p, 0); err != nil {
		t.Fatal(err)
	}
	h.Close()
	c.Close()
	if n := src.count(0); n != 1 {
		t.Fatalf("chunk 0 fetched %d times before restart", n)
	}

	c2 := open()
	h2 := c2.Open(k, src.plan())
	if got := readAll(t, h2); !bytes.Equal(got, data) {
		t.Fatal("wrong bytes after restart")
	}
	h2.Close()
	if n := src.count(0); n != 1 {
		t.Fatalf("chunk 0 fetched %d times, want once (kept across the restart)", n)
	}
	waitFor(t, "verification", func() bool { i, _ := c2.Stat(k); return i.Verified })
	c2.Close()

	// And all of it is there after another restart.
	c3 := open()
	defer c3.Close()
	before := src.total()
	h3 := c3.Open(k, src.plan())
	defer h3.Close()
	if got := readAll(t, h3); !bytes.Equal(got, data) || src.total() != before {
		t.Fatalf("after the second restart: equal %v, %d fetches", bytes.Equal(got, data), src.total()-before)
	}
}

// Filling many blobs leaves no file open per blob once their readers are
// gone: descriptors follow the blobs in use, not the blobs cached.
func TestFilledBlobsCloseTheirFiles(t *testing.T) {
	const blobs = 300
	c := open(t, t.TempDir(), 1<<30, nil, nil)
	defer c.Close()
	src := newFake("upstream", true)
	before := openFDs(t)
	var keys []blob.Key
	for range blobs {
		data, k := randBlob(t, 3*cs+5)
		src.blobs[k] = data
		keys = append(keys, k)
		h := c.Open(k, src.plan())
		if got := readAll(t, h); !bytes.Equal(got, data) {
			t.Fatal("wrong bytes")
		}
		h.Close()
	}
	// Once flushed and verified, idle blobs hold no files.
	waitFor(t, "files closed", func() bool { return openFDs(t)-before <= 20 })
	fetches := src.total()
	for _, k := range keys[:10] {
		h := c.Open(k, src.plan())
		if got := readAll(t, h); !bytes.Equal(got, src.blobs[k]) {
			t.Fatalf("%s: wrong bytes read again", k)
		}
		h.Close()
	}
	if src.total() != fetches {
		t.Fatalf("reading filled blobs again cost %d fetches", src.total()-fetches)
	}
}
