package cache

import (
	"os"
	"path/filepath"
	"testing"
)

// TestEachKindOfDamagedEntryIsDropped damages one file of a cached blob in
// each way a crash or a bad disk could and checks that the next start drops
// the entry (not listed, folder removed) instead of serving from it.
func TestEachKindOfDamagedEntryIsDropped(t *testing.T) {
	damages := []struct {
		name   string
		damage func(t *testing.T, dir string)
	}{
		{"meta not JSON", func(t *testing.T, dir string) {
			writeOrFail(t, filepath.Join(dir, "meta"), []byte("{\"size\": 12"))
		}},
		{"data file shorter than meta's size", func(t *testing.T, dir string) {
			if err := os.Truncate(filepath.Join(dir, "data"), 2*cs); err != nil {
				t.Fatal(err)
			}
		}},
		{"data file longer than meta's size", func(t *testing.T, dir string) {
			if err := os.Truncate(filepath.Join(dir, "data"), 4*cs); err != nil {
				t.Fatal(err)
			}
		}},
		{"chunk map shorter than the blob's chunks", func(t *testing.T, dir string) {
			if err := os.Truncate(filepath.Join(dir, "chunks"), 2); err != nil {
				t.Fatal(err)
			}
		}},
		{"chunk map with an unknown state", func(t *testing.T, dir string) {
			writeOrFail(t, filepath.Join(dir, "chunks"), []byte{stateTrusted, 0x7f, stateTrusted})
		}},
	}
	for _, d := range damages {
		t.Run(d.name, func(t *testing.T) {
			dir := t.TempDir()
			c := open(t, dir, 1<<30, nil, nil)
			src := newFake("upstream", true)
			data, k := randBlob(t, 3*cs)
			src.blobs[k] = data
			h := c.Open(k, src.plan())
			readAll(t, h)
			h.Close()
			c.Close()
			if _, err := os.Stat(filepath.Join(blobDir(dir, k), "meta")); err != nil {
				t.Fatalf("the blob was not stored before the damage: %v", err)
			}
			d.damage(t, blobDir(dir, k))
			c2 := open(t, dir, 1<<30, nil, nil)
			defer c2.Close()
			if i, ok := c2.Stat(k); ok {
				t.Fatalf("damaged blob still listed: %+v", i)
			}
			if _, err := os.Stat(blobDir(dir, k)); !os.IsNotExist(err) {
				t.Fatalf("damaged blob folder not removed: %v", err)
			}
		})
	}
}

func writeOrFail(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
