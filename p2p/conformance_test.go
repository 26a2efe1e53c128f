package p2p

import (
	"io"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/blob/sourcetest"
)

// trickleReader hands out zeros, 8 KiB every 20 ms: a holder that is slow
// but never quiet long enough for the asker's stall timeout.
type trickleReader struct{}

func (trickleReader) Read(p []byte) (int, error) {
	time.Sleep(20 * time.Millisecond)
	return copy(p, make([]byte, min(len(p), 8<<10))), nil
}

// The peer source, asking a real second node on loopback, passes the
// blob.Source contract.
func TestSourceConformance(t *testing.T) {
	if testing.Short() {
		t.Skip("starts libp2p hosts")
	}
	sourcetest.Run(t, sourcetest.Options{}, func(t *testing.T, b sourcetest.Blobs) sourcetest.Fixture {
		holder := startNode(t, nil)
		asker := startNode(t, nil, holder)
		waitFor(t, "asker connected to holder", func() bool { return asker.RoutingTableSize() > 0 })
		for _, data := range b.Data {
			holder.store.put(data)
		}
		holder.AddStore(LocalStoreFunc(func(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
			if k != b.Slow {
				return nil, -1, blob.ErrNotFound
			}
			return io.NopCloser(trickleReader{}), sourcetest.SlowSize, nil
		}))
		keys := []blob.Key{b.Slow}
		for k := range b.Data {
			keys = append(keys, k)
		}
		for _, k := range keys {
			holder.Announcer("test").Holding(k)
		}
		waitFor(t, "holder advertised every blob", func() bool {
			var provides float64
			mfs, _ := holder.reg.Gather()
			for _, mf := range mfs {
				if mf.GetName() == "peerd_p2p_provides_total" {
					for _, m := range mf.GetMetric() {
						provides += m.GetCounter().GetValue()
					}
				}
			}
			return provides >= float64(len(keys))
		})
		src := asker.Source()
		return sourcetest.Fixture{Source: func(blob.Key) blob.Source { return src }}
	})
}
