package cache

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// writeAt splits a write into pieces: every byte must land at its offset,
// also for lengths that are no multiple of the piece and with several
// writers at once on disjoint ranges.
func TestWriteAtLandsEveryPiece(t *testing.T) {
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "data"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	e := &entry{}
	lens := []int{1, writePiece - 1, writePiece, writePiece + 1, 3*writePiece + 12345}
	var want []byte
	var offs []int64
	var off int64 = 7
	for _, n := range lens {
		b, _ := randBlob(t, n)
		want = append(want, b...)
		offs = append(offs, off)
		off += int64(n)
	}
	var wg sync.WaitGroup
	pos := 0
	for i, n := range lens {
		wg.Add(1)
		go func(p []byte, off int64) {
			defer wg.Done()
			if err := e.writeAt(f, nil, p, off); err != nil {
				t.Error(err)
			}
		}(want[pos:pos+n], offs[i])
		pos += n
	}
	wg.Wait()
	got := make([]byte, len(want))
	if _, err := f.ReadAt(got, 7); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("bytes written in pieces read back different")
	}
	if err := e.writeAt(f, nil, []byte{1}, -1); err == nil {
		t.Fatal("a write at a negative offset succeeded")
	}
}

// A blob whose chunks are larger than a write piece (and not a multiple of
// it) fills, verifies and reads back after a restart.
func TestChunksLargerThanAWritePiece(t *testing.T) {
	dir := t.TempDir()
	chunk := int64(2*writePiece + 4096 + 3)
	opts := Options{Dir: dir, ChunkSize: chunk, FlushInterval: 10 * time.Millisecond}
	c := Must(Open(opts))
	src := newFake("upstream", true)
	data, k := randBlob(t, int(5*chunk+777))
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	if got := readAll(t, h); !bytes.Equal(got, data) {
		t.Fatal("wrong bytes from a fill")
	}
	waitFor(t, "verification", func() bool { return h.Info().Verified })
	h.Close()
	c.Close()

	c2 := Must(Open(opts))
	defer c2.Close()
	before := src.total()
	h2 := c2.Open(k, src.plan())
	defer h2.Close()
	var buf bytes.Buffer
	if _, err := h2.WriteRange(context.Background(), &buf, 0, int64(len(data))); err != nil || !bytes.Equal(buf.Bytes(), data) {
		t.Fatalf("after restart: err=%v equal=%v", err, bytes.Equal(buf.Bytes(), data))
	}
	if src.total() != before {
		t.Fatalf("restart cost %d fetches, want 0", src.total()-before)
	}
}

// A complete blob found unverified at start is hashed from its file (no
// fill buffer to borrow): a good one verifies, a corrupted one is dropped.
func TestCompleteUnverifiedBlobIsVerifiedAtStart(t *testing.T) {
	for _, corrupt := range []bool{false, true} {
		dir := t.TempDir()
		opts := Options{Dir: dir, ChunkSize: 100 << 10, FlushInterval: 10 * time.Millisecond}
		c := Must(Open(opts))
		src := newFake("upstream", true)
		data, k := randBlob(t, 3*(100<<10)+5)
		src.blobs[k] = data
		h := c.Open(k, src.plan())
		readAll(t, h)
		waitFor(t, "verification", func() bool { return h.Info().Verified })
		h.Close()
		c.Close()
		bdir := blobDir(dir, k)
		m, err := readMeta(bdir)
		if err != nil {
			t.Fatal(err)
		}
		m.Verified = false
		if err := writeMeta(bdir, m); err != nil {
			t.Fatal(err)
		}
		if corrupt {
			f, err := os.OpenFile(filepath.Join(bdir, "data"), os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt([]byte{data[200<<10] ^ 0xff}, 200<<10)
			f.Close()
		}
		c2 := Must(Open(opts))
		if corrupt {
			waitFor(t, "the corrupted blob dropped", func() bool { i, ok := c2.Stat(k); return !ok || i.Present == 0 })
		} else {
			waitFor(t, "verification at start", func() bool { i, _ := c2.Stat(k); return i.Verified })
		}
		c2.Close()
	}
}
