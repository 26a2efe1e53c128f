package cache

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestChunkMapWaitsForTheDataSync checks the order of a flush: the data
// file is synced first and only then are the chunks marked present in the
// chunk map. A data sync that fails must leave the chunk map untouched, so
// a crash after it can never find a chunk marked present over bytes that
// did not reach the disk.
func TestChunkMapWaitsForTheDataSync(t *testing.T) {
	dir := t.TempDir()
	// No flusher tick and no read-ahead during the test: the flush below is
	// the only one, and it covers exactly the chunks read.
	c := Must(Open(Options{Dir: dir, ChunkSize: cs, ReadAhead: -1, FlushInterval: time.Hour}))
	defer c.Close()
	src := newFake("upstream", true)
	data, k := randBlob(t, 8*cs)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	defer h.Close()
	p := make([]byte, 2*cs)
	if _, err := h.ReadAt(context.Background(), p, 0); err != nil || !bytes.Equal(p, data[:2*cs]) {
		t.Fatalf("read: %v, bytes equal %v", err, bytes.Equal(p, data[:2*cs]))
	}
	c.mu.Lock()
	e := c.blobs[k]
	c.mu.Unlock()
	if e == nil {
		t.Fatal("no entry for the blob read")
	}
	mapFile := filepath.Join(blobDir(dir, k), "chunks")
	before, err := os.ReadFile(mapFile)
	if err != nil {
		t.Fatal(err)
	}
	if before[0] != stateAbsent || before[1] != stateAbsent {
		t.Fatalf("chunk map %v before any flush, want chunks 0 and 1 absent", before)
	}

	// A data file whose sync fails: fdatasync on a pipe is EINVAL.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	defer r.Close()
	e.mu.Lock()
	if e.f == nil || len(e.dirtyIdx) == 0 {
		e.mu.Unlock()
		t.Fatalf("entry has no open data file or nothing to flush (dirty %v)", e.dirtyIdx)
	}
	data0 := e.f
	e.f = r
	e.mu.Unlock()
	ferr := e.flush()
	e.mu.Lock()
	e.f = data0
	e.mu.Unlock()
	if ferr == nil {
		t.Fatal("flush reported no error although the data file's sync failed")
	}
	after, err := os.ReadFile(mapFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(after, before) {
		t.Fatalf("chunk map changed from %v to %v although the data sync failed (%v)", before, after, ferr)
	}

	// With the data file back, the next chunk's flush marks it present.
	if _, err := h.ReadAt(context.Background(), p[:cs], 2*cs); err != nil {
		t.Fatal(err)
	}
	if err := e.flush(); err != nil {
		t.Fatal(err)
	}
	after, err = os.ReadFile(mapFile)
	if err != nil {
		t.Fatal(err)
	}
	if after[2] == stateAbsent {
		t.Fatalf("chunk map %v after a good flush, want chunk 2 present", after)
	}
}
