package cache

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// TestMetaIsReplacedNotRewritten checks that meta is replaced by an atomic
// rename, never rewritten in place: a crash in the middle of writing it
// must leave either the old or the new file, never a cut one. A hard link
// to meta taken before verification still holds the old, complete meta
// once the blob's meta says verified, and no temporary file is left behind.
func TestMetaIsReplacedNotRewritten(t *testing.T) {
	dir := t.TempDir()
	c := Must(Open(Options{Dir: dir, ChunkSize: cs, ReadAhead: -1}))
	defer c.Close()
	src := newFake("upstream", true)
	data, k := randBlob(t, 3*cs)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	defer h.Close()
	if _, err := h.ReadAt(context.Background(), make([]byte, cs), 0); err != nil {
		t.Fatal(err)
	}
	bdir := blobDir(dir, k)
	if m, err := readMeta(bdir); err != nil || m.Verified {
		t.Fatalf("meta after the first chunk: %+v, %v; want one not verified", m, err)
	}
	// Held next to the cache's blobs folder: the same filesystem.
	held := filepath.Join(dir, "held-meta")
	if err := os.Link(filepath.Join(bdir, "meta"), held); err != nil {
		t.Fatal(err)
	}
	readAll(t, h)
	waitFor(t, "meta on disk to say verified", func() bool {
		m, err := readMeta(bdir)
		return err == nil && m.Verified
	})
	b, err := os.ReadFile(held)
	if err != nil {
		t.Fatal(err)
	}
	var old meta
	if err := json.Unmarshal(b, &old); err != nil || old.Verified || old.Key != k {
		t.Fatalf("the meta file held from before verification now reads %q (%v): it was rewritten in place, not replaced", b, err)
	}
	if _, err := os.Stat(filepath.Join(bdir, "meta.tmp")); !os.IsNotExist(err) {
		t.Fatalf("temporary meta left behind: %v", err)
	}
}
