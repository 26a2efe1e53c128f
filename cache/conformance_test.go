package cache

import (
	"context"
	"io"
	"testing"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/blob/sourcetest"
	"github.com/prometheus/client_golang/prometheus"
)

// localFunc adapts the cache to the local-store shape as the daemon does
// (cmd/peerd's p2p wiring): a nil *LocalReader never goes into the interface.
type localFunc func(k blob.Key, off, n int64) (io.ReadCloser, int64, error)

func (f localFunc) OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	return f(k, off, n)
}

// The cache, filled from a trusted source, serves what it holds as every
// local store must. It keeps chunks, and an empty blob has none: it never
// holds one (entry.store), so it answers "not held" for it.
func TestLocalStoreConformance(t *testing.T) {
	sourcetest.RunLocal(t, sourcetest.LocalOptions{NoEmptyBlobs: true}, func(t *testing.T, blobs map[blob.Key][]byte) sourcetest.Local {
		c := open(t, t.TempDir(), 1<<30, prometheus.NewRegistry(), nil)
		t.Cleanup(func() { c.Close() })
		origin := newFake("upstream", true)
		for k, data := range blobs {
			origin.blobs[k] = data
			h := c.Open(k, origin.plan())
			size, err := h.Size(context.Background())
			if err != nil {
				t.Fatalf("fill %s: %v", k, err)
			}
			p := make([]byte, size)
			if n, err := h.ReadAt(context.Background(), p, 0); int64(n) != size || (err != nil && err != io.EOF) {
				t.Fatalf("fill %s: %d of %d bytes, %v", k, n, size, err)
			}
			h.Close()
		}
		return localFunc(func(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
			r, size, err := c.OpenLocal(k, off, n)
			if err != nil {
				return nil, size, err
			}
			return r, size, nil
		})
	})
}
