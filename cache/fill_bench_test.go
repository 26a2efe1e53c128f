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
		h := c.Open(k, src.plan())
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

// benchHit returns a cache holding a verified 64 MiB blob, reopened (as
// after a restart) and read once.
func benchHit(b *testing.B) (*Cache, *Handle, int64) {
	const size = 64 << 20
	src := newFake("upstream", true)
	data, k := randBlob(b, size)
	src.blobs[k] = data
	opts := Options{Dir: b.TempDir(), ChunkSize: 1 << 20}
	c := Must(Open(opts))
	h := c.Open(k, src.plan())
	if _, err := h.WriteRange(context.Background(), io.Discard, 0, size); err != nil {
		b.Fatal(err)
	}
	waitFor(b, "verification", func() bool { return h.Info().Verified })
	h.Close()
	c.Close()
	c = Must(Open(opts))
	h = c.Open(k, src.plan())
	if _, err := h.WriteRange(context.Background(), io.Discard, 0, size); err != nil {
		b.Fatal(err)
	}
	if !h.Info().Verified {
		b.Fatal("not verified after reopening")
	}
	b.Cleanup(func() { h.Close(); c.Close() })
	return c, h, size
}

// BenchmarkHitWriteRange serves a cached, verified blob in 1 MiB ranges
// through WriteRange (the /blobs/ face's path).
func BenchmarkHitWriteRange(b *testing.B) {
	_, h, size := benchHit(b)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for off := int64(0); off < size; off += 1 << 20 {
			if _, err := h.WriteRange(context.Background(), io.Discard, off, 1<<20); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkHitReadAt reads a cached, verified blob in 128 KiB pieces
// through ReadAt (the FUSE face's lazy path).
func BenchmarkHitReadAt(b *testing.B) {
	_, h, size := benchHit(b)
	p := make([]byte, 128<<10)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for off := int64(0); off < size; off += int64(len(p)) {
			if _, err := h.ReadAt(context.Background(), p, off); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkHitOpenLocal serves a cached, verified blob in 1 MiB ranges
// through OpenLocal (the peer server's and /v2/'s path).
func BenchmarkHitOpenLocal(b *testing.B) {
	c, h, size := benchHit(b)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for off := int64(0); off < size; off += 1 << 20 {
			lr, _, err := c.OpenLocal(h.Key(), off, 1<<20)
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(io.Discard, lr)
			lr.Close()
		}
	}
}
