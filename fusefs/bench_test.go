package fusefs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// genSource serves one deterministic pseudo-random blob of any size without
// holding it in memory: every 1 MiB block is generated from its index.
type genSource struct {
	key  blob.Key
	size int64
}

const genBlock = 1 << 20

func genFill(p []byte, block int64) {
	r := rand.New(rand.NewPCG(uint64(block), 0x5eed))
	for i := 0; i+8 <= len(p); i += 8 {
		v := r.Uint64()
		p[i], p[i+1], p[i+2], p[i+3], p[i+4], p[i+5], p[i+6], p[i+7] =
			byte(v), byte(v>>8), byte(v>>16), byte(v>>24), byte(v>>32), byte(v>>40), byte(v>>48), byte(v>>56)
	}
}

func newGenSource(size int64) *genSource {
	h := sha256.New()
	buf := make([]byte, genBlock)
	for off := int64(0); off < size; off += genBlock {
		genFill(buf, off/genBlock)
		h.Write(buf[:min(genBlock, size-off)])
	}
	return &genSource{key: blob.Key("sha256:" + hex.EncodeToString(h.Sum(nil))), size: size}
}

func (g *genSource) Name() string { return "gen" }

func (g *genSource) Fetch(ctx context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	if k != g.key {
		return nil, -1, blob.ErrNotFound
	}
	end := min(off+n, g.size)
	out := make([]byte, 0, end-off)
	buf := make([]byte, genBlock)
	for pos := off; pos < end; {
		b := pos / genBlock
		genFill(buf, b)
		lo, hi := pos-b*genBlock, min(end-b*genBlock, genBlock)
		out = append(out, buf[lo:hi]...)
		pos = b*genBlock + hi
	}
	return io.NopCloser(bytes.NewReader(out)), g.size, nil
}

// seqRead reads the whole file with 1 MiB reads and returns MB/s.
func seqRead(tb testing.TB, path string, size int64) float64 {
	return seqReadBy(tb, path, size, 1<<20)
}

// seqReadBy reads the whole file with reads of bs bytes and returns MB/s.
func seqReadBy(tb testing.TB, path string, size int64, bs int) float64 {
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, bs)
	start := time.Now()
	// Both sides plain: io.Discard's own ReadFrom would read 8 KiB at a time
	// whatever buf is.
	n, err := io.CopyBuffer(struct{ io.Writer }{io.Discard}, struct{ io.Reader }{f}, buf)
	if err != nil || n != size {
		tb.Fatalf("read %s: %d bytes, %v", path, n, err)
	}
	return float64(n) / 1e6 / time.Since(start).Seconds()
}

// randReads does 4 KiB preads at random aligned offsets and returns reads/s.
// dropFirst evicts the file's pages first, so the reads reach the filesystem.
func randReads(tb testing.TB, path string, size int64, count int, dropFirst bool) float64 {
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if dropFirst {
		unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
	}
	r := rand.New(rand.NewPCG(42, 42))
	buf := make([]byte, 4096)
	start := time.Now()
	for i := 0; i < count; i++ {
		off := r.Int64N(size/4096) * 4096
		if _, err := f.ReadAt(buf, off); err != nil {
			tb.Fatalf("pread %s at %d: %v", path, off, err)
		}
	}
	return float64(count) / time.Since(start).Seconds()
}

func localBytes(tb testing.TB, reg *prometheus.Registry) float64 {
	mfs, err := reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() == "peerd_fuse_read_bytes_total" {
			for _, m := range mf.GetMetric() {
				if m.GetLabel()[0].GetValue() == "local" {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	return sum
}

func best(tb testing.TB, runs int, f func() float64) float64 {
	var b float64
	for i := 0; i < runs; i++ {
		b = max(b, f())
	}
	return b
}

// BenchmarkMountVsBackingFile reads a cached, verified 1 GiB blob (set
// PEERD_BENCH_SIZE to change) sequentially and at random 4 KiB offsets
// through the mount, with and without passthrough, and directly from the
// cache's backing file, and prints the ratios. Both sides read from a warm
// page cache of the backing file, so the ratio measures the mount's
// overhead, not the disk. Run it with:
//
//	go test -run '^$' -bench MountVsBackingFile -benchtime 1x ./fusefs/
func BenchmarkMountVsBackingFile(b *testing.B) {
	needFUSE(b)
	size := int64(1 << 30)
	if s := os.Getenv("PEERD_BENCH_SIZE"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n <= 0 {
			b.Fatalf("PEERD_BENCH_SIZE=%q: want a byte count", s)
		}
		size = n
	}
	gen := newGenSource(size)
	base := b.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	c, err := cache.Open(cache.Options{Dir: filepath.Join(base, "cache"), ChunkSize: 1 << 20, MaxBytes: size + 64<<20, Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	reg := prometheus.NewRegistry()
	mount := func(name string, pass bool) *FS {
		var r prometheus.Registerer
		if !pass {
			r = reg
		}
		f, err := Mount(Options{
			Mountpoint: filepath.Join(base, name), Cache: c, Logger: log, Registerer: r,
			Plan:               func(blob.Key, blob.Source) cache.Plan { return cache.Plan{Peers: gen} },
			DisablePassthrough: !pass, BackingDir: filepath.Join(base, "cache"),
		})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { f.Close(context.Background()) })
		return f
	}
	pt := mount("pass", true)
	fb := mount("fallback", false)
	ptPath := filepath.Join(pt.Mountpoint(), dirName, gen.key.Hex())
	fbPath := filepath.Join(fb.Mountpoint(), dirName, gen.key.Hex())

	// Cold: every byte fetched through the cache from an in-memory source.
	cold := seqRead(b, fbPath, size)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if i, ok := c.Stat(gen.key); ok && i.Verified {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("blob never verified")
		}
		time.Sleep(10 * time.Millisecond)
	}
	lr, _, err := c.OpenLocal(gen.key, 0, -1)
	if err != nil {
		b.Fatal(err)
	}
	backing := lr.File().Name()
	lr.Close()

	b.ResetTimer()
	// Alternate the two so a burst of load from other processes hits both.
	var direct, viaPT, direct8k, viaPT8k float64
	for i := 0; i < 4; i++ {
		direct = max(direct, seqRead(b, backing, size))
		viaPT = max(viaPT, seqRead(b, ptPath, size))
		// Small reads show the passthrough's fixed cost per read call.
		direct8k = max(direct8k, seqReadBy(b, backing, size, 8<<10))
		viaPT8k = max(viaPT8k, seqReadBy(b, ptPath, size, 8<<10))
	}
	fbFirst := seqRead(b, fbPath, size) // first verified open: the kernel's pages are dropped
	served := localBytes(b, reg)
	fbWarm := best(b, 2, func() float64 { return seqRead(b, fbPath, size) })
	servedWarm := localBytes(b, reg) - served

	const nRand = 100000
	var randDirect, randPT float64
	for i := 0; i < 3; i++ {
		randDirect = max(randDirect, randReads(b, backing, size, nRand, false))
		randPT = max(randPT, randReads(b, ptPath, size, nRand, false))
	}
	randFBCold := randReads(b, fbPath, size, nRand/5, true)
	randFBWarm := best(b, 2, func() float64 { return randReads(b, fbPath, size, nRand, false) })
	b.StopTimer()

	mode := "passthrough"
	if !pt.Passthrough() {
		mode = "passthrough NOT granted by the kernel (fallback)"
	}
	fmt.Printf("fusefs bench, %d MiB cached verified blob (%s):\n", size>>20, mode)
	fmt.Printf("  sequential MB/s: backing file %.0f | mount %.0f (ratio %.2f) | no-passthrough first read %.0f (ratio %.2f), page-cached %.0f (ratio %.2f) | cold fill through the cache %.0f\n",
		direct, viaPT, viaPT/direct, fbFirst, fbFirst/direct, fbWarm, fbWarm/direct, cold)
	fmt.Printf("  sequential 8 KiB reads MB/s: backing file %.0f | mount %.0f (ratio %.2f)\n", direct8k, viaPT8k, viaPT8k/direct8k)
	fmt.Printf("  no-passthrough: peerd served %d MiB for the first read, %d MiB for the page-cached ones\n", int64(served)>>20, int64(servedWarm)>>20)
	fmt.Printf("  random 4 KiB reads/s: backing file %.0f | mount %.0f (ratio %.2f) | no-passthrough uncached %.0f, page-cached %.0f\n",
		randDirect, randPT, randPT/randDirect, randFBCold, randFBWarm)
	b.ReportMetric(viaPT/direct, "seq-ratio")
	b.ReportMetric(viaPT8k/direct8k, "seq8k-ratio")
	b.ReportMetric(fbFirst/direct, "seq-ratio-no-passthrough")
	b.ReportMetric(randPT/randDirect, "rand4k-ratio")
	b.ReportMetric(randPT, "rand4k-mount-reads/s")
	b.ReportMetric(randDirect, "rand4k-file-reads/s")
}
