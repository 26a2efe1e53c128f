package cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"
)

// residentPages counts the pages of path the page cache holds.
func residentPages(t *testing.T, path string) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, errno := syscall.Syscall(syscall.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal(errno)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

func directCache(t *testing.T, opts Options) *Cache {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	if opts.ChunkSize == 0 {
		opts.ChunkSize = 64 << 10
	}
	c, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// filledBlob fills a random blob of size into c from a trusted origin,
// reads it whole and waits until it verified.
func filledBlob(t *testing.T, c *Cache, size int) blob.Key {
	t.Helper()
	src := newFake("upstream", true)
	data, k := randBlob(t, size)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	defer h.Close()
	if got := readAll(t, h); !bytes.Equal(got, data) {
		t.Fatal("bytes differ")
	}
	waitFor(t, "verification", func() bool { return h.Info().Verified })
	return k
}

// requireDirect skips when the test's file system refuses direct I/O: the
// cache then works buffered, which other tests cover.
func requireDirect(t *testing.T, c *Cache) {
	t.Helper()
	if !c.direct.Load() {
		t.Skipf("skipping: the file system under %s refuses O_DIRECT", c.opts.Dir)
	}
}

// A blob filled from nothing and read by the client that asked for it never
// enters the page cache: chunks go to the disk with direct I/O and the
// reader and the hash get them from the fill's buffers. With
// BufferedWrites the same fill leaves its pages cached.
func TestDirectFillLeavesThePageCacheAlone(t *testing.T) {
	for _, buffered := range []bool{false, true} {
		// Enough held chunks that none is dropped before the reader comes:
		// a chunk read after the blob verified may come through the page
		// cache, as it should.
		c := directCache(t, Options{BufferedWrites: buffered, HeldChunks: 128})
		src := newFake("upstream", true)
		data, k := randBlob(t, 4<<20)
		src.blobs[k] = data
		h := c.Open(k, src.plan())
		var got bytes.Buffer
		if _, err := h.WriteRange(context.Background(), &got, 0, int64(len(data))); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Bytes(), data) {
			t.Fatal("bytes differ")
		}
		waitFor(t, "verification", func() bool { return h.Info().Verified })
		h.Close()
		if !buffered {
			requireDirect(t, c)
		}
		pages := residentPages(t, filepath.Join(blobDir(c.opts.Dir, k), "data"))
		total := len(data) / os.Getpagesize()
		t.Logf("buffered=%v: %d of %d pages in the page cache", buffered, pages, total)
		if !buffered && pages != 0 {
			t.Errorf("direct fill left %d of %d pages in the page cache", pages, total)
		}
		if buffered && pages < total/2 {
			t.Errorf("buffered fill left only %d of %d pages in the page cache: the check cannot tell the modes apart", pages, total)
		}
	}
}

// Held chunks stay within their bound while a blob fills, and every read
// (the ones that find no held copy read with direct I/O) returns the blob's
// bytes.
func TestHeldChunksStayBounded(t *testing.T) {
	for _, bound := range []int{3, -1} {
		c := directCache(t, Options{HeldChunks: bound, ReadAhead: 8})
		requireDirect(t, c)
		src := newFake("upstream", true)
		data, k := randBlob(t, 40*64<<10)
		src.blobs[k] = data
		stop := make(chan struct{})
		most := make(chan int)
		go func() {
			m := 0
			for {
				select {
				case <-stop:
					most <- m
					return
				default:
				}
				m = max(m, c.heldCount())
			}
		}()
		h := c.Open(k, src.plan())
		got := readAll(t, h)
		close(stop)
		m := <-most
		if !bytes.Equal(got, data) {
			t.Fatalf("bound %d: bytes differ", bound)
		}
		waitFor(t, "verification", func() bool { return h.Info().Verified })
		h.Close()
		t.Logf("bound %d: at most %d chunks held", bound, m)
		if want := max(bound, 0); m > want {
			t.Fatalf("bound %d: %d chunks held", bound, m)
		}
		if bound > 0 && m == 0 {
			t.Fatalf("bound %d: no chunk was ever held", bound)
		}
	}
}

// Readers jumping around a blob in direct mode, with no held copies to
// fall back on, read every range right, and the blob verifies.
func TestDirectModeRandomReads(t *testing.T) {
	c := directCache(t, Options{HeldChunks: -1})
	requireDirect(t, c)
	src := newFake("upstream", true)
	data, k := randBlob(t, 30*64<<10+777) // the last chunk is not block-aligned
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	defer h.Close()
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 1))
			for range 60 {
				off := r.Int64N(int64(len(data)))
				n := min(r.Int64N(200<<10)+1, int64(len(data))-off)
				p := make([]byte, n)
				if _, err := h.ReadAt(context.Background(), p, off); err != nil && !errors.Is(err, io.EOF) {
					t.Error(err)
					return
				}
				if !bytes.Equal(p, data[off:off+n]) {
					t.Errorf("range %d+%d differs", off, n)
					return
				}
			}
		}()
	}
	wg.Wait()
	if got := readAll(t, h); !bytes.Equal(got, data) {
		t.Fatal("whole blob differs")
	}
	waitFor(t, "verification", func() bool { return h.Info().Verified })
}

// OpenLocal of a blob still filling in direct mode hands out a reader that
// reads around the page cache (no file), with the right bytes, for readers
// of any size at any offset, from held copies or the disk.
func TestOpenLocalInDirectMode(t *testing.T) {
	for _, held := range []int{0, -1} {
		c := directCache(t, Options{HeldChunks: held})
		requireDirect(t, c)
		src := newFake("upstream", true)
		data, k := randBlob(t, 16*64<<10)
		src.blobs[k] = data
		half := int64(len(data) / 2)
		// The second half stays missing, so the blob stays in direct mode.
		never := make(chan struct{})
		for off := half; off < int64(len(data)); off += 64 << 10 {
			src.block[off] = never
		}
		h := c.Open(k, src.plan())
		if _, err := h.WriteRange(context.Background(), io.Discard, 0, half); err != nil {
			t.Fatal(err)
		}
		for _, r := range []struct{ off, n, piece int64 }{{100, half - 100, 1000}, {64<<10 - 5, 3*64<<10 + 9, 4096}, {0, half, 64 << 10}} {
			lr, _, err := c.OpenLocal(k, r.off, r.n)
			if err != nil {
				t.Fatal(err)
			}
			if lr.File() != nil {
				t.Fatal("a reader of a blob in direct mode exposes its file")
			}
			var got bytes.Buffer
			if _, err := io.CopyBuffer(&got, struct{ io.Reader }{lr}, make([]byte, r.piece)); err != nil {
				t.Fatal(err)
			}
			lr.Close()
			if !bytes.Equal(got.Bytes(), data[r.off:r.off+r.n]) {
				t.Fatalf("held %d: range %d+%d read in %d-byte pieces differs", held, r.off, r.n, r.piece)
			}
		}
		h.Close()
	}
}

// A file system that refuses O_DIRECT leaves the cache buffered, saying so
// once, and everything works as before.
func TestDirectRefusedFallsBackToBuffered(t *testing.T) {
	old := openDirectFile
	openDirectFile = func(path string) (*os.File, error) {
		return nil, &os.PathError{Op: "open", Path: path, Err: syscall.EINVAL}
	}
	defer func() { openDirectFile = old }()
	c := directCache(t, Options{})
	k := filledBlob(t, c, 8*64<<10)
	if c.direct.Load() {
		t.Fatal("direct I/O still on after the file system refused it")
	}
	if pages := residentPages(t, filepath.Join(blobDir(c.opts.Dir, k), "data")); pages == 0 {
		t.Fatal("a buffered fill left nothing in the page cache")
	}
}

// Held chunks nobody came for are let go after a while, so an idle node
// keeps no chunk buffers.
func TestStaleHeldChunksGo(t *testing.T) {
	c := directCache(t, Options{})
	requireDirect(t, c)
	filledBlob(t, c, 8*64<<10)
	if c.heldCount() == 0 {
		t.Fatal("no chunk held after a fill")
	}
	c.dropStaleHeld(time.Now().Add(-time.Hour))
	if c.heldCount() == 0 {
		t.Fatal("fresh held chunks dropped")
	}
	// A fill gives its reference back just after it wakes its readers; once
	// every fill is done, every stale chunk goes.
	waitFor(t, "stale held chunks dropped", func() bool {
		c.dropStaleHeld(time.Now().Add(time.Second))
		return c.heldCount() == 0
	})
}

// Chunks larger than one direct read's span are read a span at a time, at
// any offset, by the faces and by OpenLocal's reader, with the right bytes.
func TestDirectReadsSpanLargeChunks(t *testing.T) {
	c := directCache(t, Options{ChunkSize: 1 << 20, HeldChunks: -1})
	requireDirect(t, c)
	src := newFake("upstream", true)
	data, k := randBlob(t, 5<<20+300)
	src.blobs[k] = data
	never := make(chan struct{})
	src.block[5<<20] = never // the last (unaligned, buffered) chunk stays missing: the blob stays in direct mode
	h := c.Open(k, src.plan())
	defer h.Close()
	if _, err := h.WriteRange(context.Background(), io.Discard, 0, 4<<20); err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct{ off, n int64 }{{0, 4 << 20}, {5, directSpan}, {directSpan - 7, 3*directSpan + 11}, {1<<20 - 100, 200}, {3<<20 + 4095, 1<<20 - 4095}} {
		var got bytes.Buffer
		if _, err := h.WriteRange(context.Background(), &got, r.off, r.n); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Bytes(), data[r.off:r.off+r.n]) {
			t.Fatalf("WriteRange %d+%d differs", r.off, r.n)
		}
		p := make([]byte, r.n)
		if _, err := h.ReadAt(context.Background(), p, r.off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, data[r.off:r.off+r.n]) {
			t.Fatalf("ReadAt %d+%d differs", r.off, r.n)
		}
		lr, _, err := c.OpenLocal(k, r.off, r.n)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(struct{ io.Reader }{lr})
		lr.Close()
		if err != nil || !bytes.Equal(b, data[r.off:r.off+r.n]) {
			t.Fatalf("OpenLocal %d+%d: %v, bytes equal %v", r.off, r.n, err, bytes.Equal(b, data[r.off:r.off+r.n]))
		}
	}
	if pages := residentPages(t, filepath.Join(blobDir(c.opts.Dir, k), "data")); pages != 0 {
		t.Fatalf("reads of a blob in direct mode left %d pages in the page cache", pages)
	}
}

// A fill hashes from its chunk buffer after holding it; with a bound of one
// held chunk, other fills' holds push it out meanwhile, and its buffer must
// not be reused under the hash (a blob from a trusted origin would fail
// verification).
func TestHeldBufferOutlivesItsFillsHash(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := directCache(t, Options{HeldChunks: 1, ReadAhead: 16, BackgroundFills: 16, Registerer: reg})
	requireDirect(t, c)
	for range 5 {
		src := newFake("upstream", true)
		data, k := randBlob(t, 64*64<<10)
		src.blobs[k] = data
		h := c.Open(k, src.plan())
		var wg sync.WaitGroup
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				off := int64(w) * int64(len(data)) / 4
				p := make([]byte, len(data)/4)
				if _, err := h.ReadAt(context.Background(), p, off); err != nil && !errors.Is(err, io.EOF) {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		readAll(t, h)
		waitFor(t, "verification", func() bool { return h.Info().Verified })
		h.Close()
	}
	if bad := testutil.ToFloat64(c.m.verify.WithLabelValues("mismatch")); bad != 0 {
		t.Fatalf("%v blobs from a trusted origin failed verification", bad)
	}
}

// Only a refusal of O_DIRECT itself turns it off for the cache; another
// failure to open (here: no such file) leaves that one blob buffered.
func TestDirectOpenFailureOtherThanEINVAL(t *testing.T) {
	old := openDirectFile
	openDirectFile = func(path string) (*os.File, error) {
		return nil, &os.PathError{Op: "open", Path: path, Err: syscall.EMFILE}
	}
	defer func() { openDirectFile = old }()
	c := directCache(t, Options{})
	requireDirect(t, c)
	filledBlob(t, c, 8*64<<10)
	if !c.direct.Load() {
		t.Fatal("a failure other than EINVAL turned direct I/O off for the cache")
	}
}
