package cache

import (
	"context"
	"io"
	"testing"
)

// BenchmarkColdFill fills a 256 MiB blob sequentially in 1 MiB reads from an
// in-memory source: the cache's own cost (write, hash, flush) per byte.
func BenchmarkColdFill(b *testing.B) {
	const size = 256 << 20
	const chunk = 1 << 20
	src := newFake("upstream", true)
	data, k := randBlob(b, size)
	src.blobs[k] = data
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		c := Must(Open(Options{Dir: b.TempDir(), ChunkSize: chunk}))
		h := c.Open(k, src)
		for off := int64(0); off < size; off += chunk {
			if _, err := h.WriteRange(context.Background(), io.Discard, off, chunk); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		h.Close()
		c.Close()
		b.StartTimer()
	}
}
