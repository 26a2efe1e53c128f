package cache

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

const cs = 4096

// fakeSource serves blobs from memory and counts what it is asked.
type fakeSource struct {
	name    string
	trusted bool
	mu      sync.Mutex
	blobs   map[blob.Key][]byte
	fetches map[int64]int // by offset
	bytes   atomic.Int64
	delay   time.Duration
	block   map[int64]chan struct{} // fetches at these offsets wait for close
	fail    error
	origin  string
	blamed  []string
}

func newFake(name string, trusted bool) *fakeSource {
	return &fakeSource{name: name, trusted: trusted, blobs: map[blob.Key][]byte{}, fetches: map[int64]int{}, block: map[int64]chan struct{}{}}
}

func (f *fakeSource) Name() string { return f.name }

// plan puts the source where its trust says: a trusted one is the origin,
// an untrusted one the peers.
func (f *fakeSource) plan() Plan {
	if f.trusted {
		return Plan{Origin: f}
	}
	return Plan{Peers: f}
}
func (f *fakeSource) Blame(k blob.Key, origin string) {
	f.mu.Lock()
	f.blamed = append(f.blamed, origin)
	f.mu.Unlock()
}

type attributed struct {
	io.ReadCloser
	origin string
}

func (a attributed) Origin() string { return a.origin }

func (f *fakeSource) Fetch(ctx context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	f.mu.Lock()
	f.fetches[off]++
	b, ok := f.blobs[k]
	ch := f.block[off]
	fail := f.fail
	f.mu.Unlock()
	if fail != nil {
		return nil, -1, fail
	}
	if ch != nil {
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, -1, ctx.Err()
		}
	}
	if f.delay > 0 {
		time.Sleep(f.delay)
	}
	if !ok {
		return nil, -1, blob.ErrNotFound
	}
	end := min(off+n, int64(len(b)))
	f.bytes.Add(end - off)
	var rc io.ReadCloser = io.NopCloser(bytes.NewReader(b[off:end]))
	if f.origin != "" {
		rc = attributed{rc, f.origin}
	}
	return rc, int64(len(b)), nil
}

func (f *fakeSource) count(off int64) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fetches[off]
}

func (f *fakeSource) total() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.fetches {
		n += c
	}
	return n
}

func randBlob(t testing.TB, n int) ([]byte, blob.Key) {
	b := make([]byte, n)
	rand.Read(b)
	s := sha256.Sum256(b)
	return b, blob.Key("sha256:" + hex.EncodeToString(s[:]))
}

type recorder struct {
	mu             sync.Mutex
	added, removed []blob.Key
}

var _ blob.Announcer = (*recorder)(nil)

func (r *recorder) Holding(ks ...blob.Key) {
	r.mu.Lock()
	r.added = append(r.added, ks...)
	r.mu.Unlock()
}
func (r *recorder) Dropped(ks ...blob.Key) {
	r.mu.Lock()
	r.removed = append(r.removed, ks...)
	r.mu.Unlock()
}
func (r *recorder) has(removed bool, k blob.Key) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.added
	if removed {
		l = r.removed
	}
	for _, x := range l {
		if x == k {
			return true
		}
	}
	return false
}

func open(t testing.TB, dir string, max int64, reg prometheus.Registerer, l blob.Announcer) *Cache {
	t.Helper()
	c, err := Open(Options{Dir: dir, ChunkSize: cs, MaxBytes: max, Registerer: reg, Announcer: l, FlushInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func readAll(t testing.TB, h *Handle) []byte {
	t.Helper()
	size, err := h.Size(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, size)
	n, err := h.ReadAt(context.Background(), p, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return p[:n]
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestReadWholeAndRanges(t *testing.T) {
	c := open(t, t.TempDir(), 1<<30, nil, nil)
	defer c.Close()
	src := newFake("upstream", true)
	data, k := randBlob(t, 10*cs+123)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	defer h.Close()
	for _, r := range []struct{ off, n int64 }{{0, 1}, {cs - 1, 2}, {3*cs + 7, 2*cs + 5}, {10 * cs, 123}, {0, int64(len(data))}} {
		p := make([]byte, r.n)
		n, err := h.ReadAt(context.Background(), p, r.off)
		if err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("ReadAt(%d,%d): %v", r.off, r.n, err)
		}
		if !bytes.Equal(p[:n], data[r.off:r.off+r.n]) {
			t.Fatalf("ReadAt(%d,%d): wrong bytes", r.off, r.n)
		}
	}
	// Past the end.
	p := make([]byte, 10)
	if n, err := h.ReadAt(context.Background(), p, int64(len(data))-4); n != 4 || !errors.Is(err, io.EOF) {
		t.Fatalf("read over the end: n=%d err=%v", n, err)
	}
	var buf bytes.Buffer
	if _, err := h.WriteRange(context.Background(), &buf, 5, int64(len(data))-5); err != nil || !bytes.Equal(buf.Bytes(), data[5:]) {
		t.Fatalf("WriteRange: err=%v equal=%v", err, bytes.Equal(buf.Bytes(), data[5:]))
	}
	for off := int64(0); off < int64(len(data)); off += cs {
		if got := src.count(off); got != 1 {
			t.Errorf("chunk at %d fetched %d times, want 1", off, got)
		}
	}
	waitFor(t, "verification", func() bool { return h.Info().Verified })
}

func TestSingleFlightPerChunk(t *testing.T) {
	c := open(t, t.TempDir(), 1<<30, nil, nil)
	defer c.Close()
	src := newFake("upstream", true)
	data, k := randBlob(t, 4*cs)
	src.blobs[k] = data
	src.delay = 20 * time.Millisecond
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := c.Open(k, src.plan())
			defer h.Close()
			p := make([]byte, 100)
			if _, err := h.ReadAt(context.Background(), p, 2*cs+10); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(p, data[2*cs+10:2*cs+110]) {
				errs <- errors.New("wrong bytes")
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := src.count(2 * cs); n != 1 {
		t.Fatalf("chunk 2 fetched %d times by 32 concurrent readers, want 1", n)
	}
}

func TestDifferentChunksProceedInParallel(t *testing.T) {
	c := Must(Open(Options{Dir: t.TempDir(), ChunkSize: cs, ReadAhead: -1}))
	defer c.Close()
	src := newFake("upstream", true)
	data, k := randBlob(t, 4*cs)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	defer h.Close()
	if _, err := h.Size(context.Background()); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	src.mu.Lock()
	src.block[1*cs] = release
	src.mu.Unlock()
	blocked := make(chan error, 1)
	go func() {
		p := make([]byte, 10)
		_, err := h.ReadAt(context.Background(), p, cs)
		blocked <- err
	}()
	waitFor(t, "fetch of chunk 1 to start", func() bool { return src.count(cs) == 1 })
	// Chunk 3 must not wait for chunk 1.
	p := make([]byte, 10)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := h.ReadAt(ctx, p, 3*cs); err != nil {
		t.Fatalf("read of chunk 3 while chunk 1 is stuck: %v", err)
	}
	select {
	case err := <-blocked:
		t.Fatalf("chunk 1 read finished before release: %v", err)
	default:
	}
	close(release)
	if err := <-blocked; err != nil {
		t.Fatal(err)
	}
}

func Must(c *Cache, err error) *Cache {
	if err != nil {
		panic(err)
	}
	return c
}

func TestPersistsAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	c := open(t, dir, 1<<30, nil, nil)
	src := newFake("upstream", true)
	data, k := randBlob(t, 5*cs+1)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	readAll(t, h)
	waitFor(t, "verification", func() bool { return h.Info().Verified })
	h.Close()
	c.Close()

	c2 := open(t, dir, 1<<30, nil, nil)
	defer c2.Close()
	before := src.total()
	h2 := c2.Open(k, src.plan())
	defer h2.Close()
	if got := readAll(t, h2); !bytes.Equal(got, data) {
		t.Fatal("wrong bytes after restart")
	}
	if src.total() != before {
		t.Fatalf("restart cost %d fetches, want 0", src.total()-before)
	}
	if i := h2.Info(); !i.Verified || !i.Complete {
		t.Fatalf("after restart: %+v, want verified and complete", i)
	}
}

// A crash (no Close, no final flush) at any point must leave a cache that
// reads back right: chunks either durable and correct, or fetched again.
func TestCrashLeavesNoWrongChunk(t *testing.T) {
	dir := t.TempDir()
	data, k := randBlob(t, 64*cs)
	for round := 0; round < 5; round++ {
		src := newFake("upstream", true)
		src.blobs[k] = data
		c, err := Open(Options{Dir: dir, ChunkSize: cs, FlushInterval: time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		h := c.Open(k, src.plan())
		p := make([]byte, 8*cs)
		h.ReadAt(context.Background(), p, int64(round*8*cs))
		c.stopFlusherForTest() // the process dies: no more writes, no final flush
		// "crash": abandon c without Close; simulate the lost page cache of
		// unsynced bytes by corrupting every chunk the chunk map does not
		// list as present on disk.
		states, _ := os.ReadFile(filepath.Join(blobDir(filepath.Join(dir), k), "chunks"))
		f, err := os.OpenFile(filepath.Join(blobDir(dir, k), "data"), os.O_RDWR, 0)
		if err == nil {
			for i := 0; i < 64; i++ {
				if i >= len(states) || states[i] == stateAbsent {
					f.WriteAt(bytes.Repeat([]byte{0xEE}, cs), int64(i*cs))
				}
			}
			f.Close()
		}
		c2, err := Open(Options{Dir: dir, ChunkSize: cs})
		if err != nil {
			t.Fatal(err)
		}
		h2 := c2.Open(k, src.plan())
		if got := readAll(t, h2); !bytes.Equal(got, data) {
			t.Fatalf("round %d: wrong bytes after crash", round)
		}
		h2.Close()
		c2.Close()
	}
}

func TestUnreadableEntriesAreDropped(t *testing.T) {
	dir := t.TempDir()
	c := open(t, dir, 1<<30, nil, nil)
	src := newFake("upstream", true)
	data, k := randBlob(t, 3*cs)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	readAll(t, h)
	h.Close()
	c.Close()
	// Damage: meta gone.
	os.Remove(filepath.Join(blobDir(dir, k), "meta"))
	c2 := open(t, dir, 1<<30, nil, nil)
	defer c2.Close()
	if _, ok := c2.Stat(k); ok {
		t.Fatal("blob without meta still listed")
	}
	if _, err := os.Stat(blobDir(dir, k)); !os.IsNotExist(err) {
		t.Fatal("damaged blob folder not removed")
	}
}

func TestVerificationMismatchDiscardsAndBlames(t *testing.T) {
	rec := &recorder{}
	// No read-ahead: a background fill racing the discard would refill a chunk.
	c := Must(Open(Options{Dir: t.TempDir(), ChunkSize: cs, ReadAhead: -1, Announcer: rec}))
	defer c.Close()
	peer := newFake("peer", false)
	peer.origin = "badpeer"
	data, k := randBlob(t, 3*cs)
	bad := append([]byte(nil), data...)
	bad[cs+5] ^= 0xff
	peer.blobs[k] = bad
	h := c.Open(k, peer.plan())
	// Filled by the prefetch, not a reader: a reader whose read overlaps
	// the discard reads its chunk again, from this same (bad) peer.
	fillInBackground(t, h)
	waitFor(t, "mismatch", func() bool {
		return testutil.ToFloat64(c.m.verify.WithLabelValues("mismatch")) == 1
	})
	if i := h.Info(); i.Present != 0 || i.Verified {
		t.Fatalf("after mismatch: %+v, want nothing present", i)
	}
	peer.mu.Lock()
	blamed := append([]string(nil), peer.blamed...)
	peer.mu.Unlock()
	if len(blamed) != 1 || blamed[0] != "badpeer" {
		t.Fatalf("blamed %v, want [badpeer]", blamed)
	}
	if !rec.has(true, k) {
		t.Fatal("listener not told the blob was removed")
	}
	h.Close()
	// A good source now fills it again and it verifies.
	good := newFake("upstream", true)
	good.blobs[k] = data
	h2 := c.Open(k, good.plan())
	defer h2.Close()
	if got := readAll(t, h2); !bytes.Equal(got, data) {
		t.Fatal("wrong bytes on refill")
	}
	waitFor(t, "verification", func() bool { return h2.Info().Verified })
}

func TestPeerBytesNotReservedBeforeVerification(t *testing.T) {
	c := Must(Open(Options{Dir: t.TempDir(), ChunkSize: cs, ReadAhead: -1}))
	defer c.Close()
	peer := newFake("peer", false)
	origin := newFake("upstream", true)
	data, k := randBlob(t, 3*cs)
	peer.blobs[k] = data
	h := c.Open(k, peer.plan())
	defer h.Close()
	p := make([]byte, 10)
	if _, err := h.ReadAt(context.Background(), p, 0); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.OpenLocal(k, 0, 10); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("OpenLocal of unverified peer bytes: %v, want ErrNotFound", err)
	}
	// A length so long that off+n overflows does not skip the check.
	if _, _, err := c.OpenLocal(k, 1, math.MaxInt64); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("OpenLocal(1, MaxInt64) of unverified peer bytes: %v, want ErrNotFound", err)
	}
	// Bytes from the origin may be passed on at once.
	origin.blobs[k] = data
	h2 := c.Open(k, origin.plan())
	defer h2.Close()
	if _, err := h2.ReadAt(context.Background(), p, 2*cs); err != nil {
		t.Fatal(err)
	}
	// The read may return with the chunk's first bytes, before it is stored.
	waitFor(t, "the origin's chunk stored", func() bool { return h2.Info().Present >= 2*cs })
	lr, size, err := c.OpenLocal(k, 2*cs, 10)
	if err != nil || size != int64(len(data)) {
		t.Fatalf("OpenLocal of origin bytes: size %d err %v", size, err)
	}
	got, _ := io.ReadAll(lr)
	lr.Close()
	if !bytes.Equal(got, data[2*cs:2*cs+10]) {
		t.Fatal("OpenLocal: wrong bytes")
	}
	// Once complete and verified, everything may be passed on.
	readAll(t, h2)
	waitFor(t, "verification", func() bool { return h2.Info().Verified })
	lr, _, err = c.OpenLocal(k, 0, -1)
	if err != nil {
		t.Fatal(err)
	}
	got, _ = io.ReadAll(lr)
	lr.Close()
	if !bytes.Equal(got, data) {
		t.Fatal("OpenLocal whole: wrong bytes")
	}
	if _, _, err := c.OpenLocal(blob.Key("sha256:"+fmt.Sprintf("%064x", 1)), 0, 1); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("OpenLocal of unknown: %v", err)
	}
}

func TestEvictsLRUButNeverABlobInUse(t *testing.T) {
	reg := prometheus.NewRegistry()
	rec := &recorder{}
	dir := t.TempDir()
	c := open(t, dir, 5*cs, reg, rec)
	defer c.Close()
	src := newFake("upstream", true)
	a, ka := randBlob(t, 2*cs)
	b, kb := randBlob(t, 2*cs)
	d, kd := randBlob(t, 2*cs)
	src.blobs[ka], src.blobs[kb], src.blobs[kd] = a, b, d

	ha := c.Open(ka, src.plan())
	readAll(t, ha)
	ha.Close()
	hb := c.Open(kb, src.plan())
	readAll(t, hb)
	hb.Close()
	c.wg.Wait() // let read-ahead fills finish: they pin the blob while they run
	// Touch a, so b is least recently used.
	ha = c.Open(ka, src.plan())
	readAll(t, ha)
	c.wg.Wait()
	hd := c.Open(kd, src.plan())
	if got := readAll(t, hd); !bytes.Equal(got, d) {
		t.Fatal("wrong bytes for d")
	}
	hd.Close()
	if c.Used() > 5*cs {
		t.Fatalf("cache holds %d bytes, bound %d", c.Used(), 5*cs)
	}
	if _, ok := c.Stat(kb); ok {
		t.Fatal("least recently used blob b was not evicted")
	}
	if _, ok := c.Stat(ka); !ok {
		t.Fatal("recently used blob a was evicted")
	}
	if !rec.has(true, kb) {
		t.Fatal("listener not told b was evicted")
	}
	if _, err := os.Stat(blobDir(dir, kb)); !os.IsNotExist(err) {
		t.Fatal("evicted blob's files remain")
	}
	// Everything pinned: a new blob is passed through, not stored, and a stays.
	hd = c.Open(kd, src.plan())
	readAll(t, hd)
	e, _ := randBlob(t, 3*cs)
	ke := blob.Key("sha256:" + fmt.Sprintf("%064x", 7))
	src.blobs[ke] = e
	he := c.Open(ke, src.plan())
	got := make([]byte, len(e))
	if _, err := he.ReadAt(context.Background(), got, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	if !bytes.Equal(got, e) {
		t.Fatal("pass-through bytes wrong")
	}
	if _, ok := c.Stat(ka); !ok {
		t.Fatal("pinned blob a was evicted")
	}
	if c.Used() > 5*cs {
		t.Fatalf("cache holds %d bytes, bound %d", c.Used(), 5*cs)
	}
	if testutil.ToFloat64(c.m.passthrough) == 0 {
		t.Fatal("no pass-through counted")
	}
	he.Close()
	hd.Close()
	ha.Close()
}

func TestSourceOrderAndFailover(t *testing.T) {
	c := open(t, t.TempDir(), 1<<30, nil, nil)
	defer c.Close()
	data, k := randBlob(t, 2*cs)
	missing := newFake("containerd", true) // has nothing
	broken := newFake("peer", false)
	broken.fail = errors.New("connection reset")
	origin := newFake("upstream", true)
	origin.blobs[k] = data
	h := c.Open(k, Plan{Local: missing, Peers: broken, Origin: origin})
	defer h.Close()
	if got := readAll(t, h); !bytes.Equal(got, data) {
		t.Fatal("wrong bytes")
	}
	if missing.total() == 0 || broken.total() == 0 {
		t.Fatal("earlier sources were not asked first")
	}
	// All fail: a clear error, not a hang.
	c2 := open(t, t.TempDir(), 1<<30, nil, nil)
	defer c2.Close()
	h2 := c2.Open(k, Plan{Local: missing, Peers: broken})
	defer h2.Close()
	_, err := h2.Size(context.Background())
	if err == nil {
		t.Fatal("no error when no source has the blob")
	}
	if !bytes.Contains([]byte(err.Error()), []byte("connection reset")) {
		t.Fatalf("error does not say what failed: %v", err)
	}
}

func TestPrefetchFillsWholeBlobOnce(t *testing.T) {
	c := open(t, t.TempDir(), 1<<30, nil, nil)
	defer c.Close()
	src := newFake("upstream", true)
	data, k := randBlob(t, 40*cs+9)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	defer h.Close()
	p := make([]byte, 1)
	h.ReadAt(context.Background(), p, 0)
	h.Prefetch(4)
	h.Prefetch(4) // no second run while one is going
	waitFor(t, "prefetch", func() bool { return h.Info().Complete })
	for off := int64(0); off < int64(len(data)); off += cs {
		if n := src.count(off); n != 1 {
			t.Fatalf("chunk at %d fetched %d times", off, n)
		}
	}
	waitFor(t, "verification", func() bool { return h.Info().Verified })
}

func TestURLKeysAreNotVerifiedOrAdvertised(t *testing.T) {
	rec := &recorder{}
	c := open(t, t.TempDir(), 1<<30, nil, rec)
	defer c.Close()
	src := newFake("upstream", true)
	k := blob.Key("url:" + fmt.Sprintf("%064x", 42))
	data := bytes.Repeat([]byte("x"), 3*cs)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	defer h.Close()
	if got := readAll(t, h); !bytes.Equal(got, data) {
		t.Fatal("wrong bytes")
	}
	if h.Info().Verified {
		t.Fatal("url-keyed blob marked verified")
	}
	if rec.has(false, k) {
		t.Fatal("url-keyed blob advertised")
	}
}

func TestContextCancelDoesNotFailOthers(t *testing.T) {
	c := Must(Open(Options{Dir: t.TempDir(), ChunkSize: cs, ReadAhead: -1}))
	defer c.Close()
	src := newFake("upstream", true)
	data, k := randBlob(t, 2*cs)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	defer h.Close()
	if _, err := h.Size(context.Background()); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	src.mu.Lock()
	src.block[cs] = release
	src.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() {
		_, err := h.ReadAt(ctx, make([]byte, 5), cs)
		first <- err
	}()
	waitFor(t, "fetch start", func() bool { return src.count(cs) == 1 })
	second := make(chan error, 1)
	p := make([]byte, 5)
	go func() {
		_, err := h.ReadAt(context.Background(), p, cs)
		second <- err
	}()
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled reader: %v", err)
	}
	close(release)
	if err := <-second; err != nil {
		t.Fatalf("second reader failed because the first went away: %v", err)
	}
	if !bytes.Equal(p, data[cs:cs+5]) {
		t.Fatal("wrong bytes")
	}
}

// Close ends the fills in flight (their sources' reads) instead of waiting
// out their deadline: a source that stopped answering cannot hold shutdown.
func TestCloseEndsFillsInFlight(t *testing.T) {
	c, err := Open(Options{Dir: t.TempDir(), ChunkSize: cs, FillTimeout: time.Hour, FlushInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	src := newFake("origin", true)
	data, k := randBlob(t, 3*cs)
	src.blobs[k] = data
	src.block[0] = make(chan struct{}) // never answers
	h := c.Open(k, src.plan())
	sized := make(chan error, 1)
	go func() {
		_, err := h.Size(context.Background())
		sized <- err
	}()
	waitFor(t, "the fill to ask the source", func() bool { return src.count(0) == 1 })
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Close still waits for a fill whose source never answers")
	}
	select {
	case err := <-sized:
		if err == nil {
			t.Fatal("the reader of the ended fill got no error")
		}
	case <-time.After(time.Minute):
		t.Fatal("the reader of the ended fill still waits")
	}
}

// sizeLiar answers every fetch with n zero bytes and claims the blob is
// size bytes long.
type sizeLiar struct{ size int64 }

func (sizeLiar) Name() string { return "liar" }
func (l sizeLiar) Fetch(ctx context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	return io.NopCloser(bytes.NewReader(make([]byte, n))), l.size, nil
}

// A size no chunk map can hold (a hostile peer, a damaged source) fails the
// read with a reason; it neither panics nor allocates it.
func TestHugeSizeFromASourceIsRefused(t *testing.T) {
	c := open(t, t.TempDir(), 1<<30, nil, nil)
	defer c.Close()
	for _, size := range []int64{math.MaxInt64, 1 << 62, maxChunks*cs + 1} {
		_, k := randBlob(t, 10)
		_, err := c.Open(k, Plan{Origin: sizeLiar{size}}).Size(context.Background())
		if err == nil || !strings.Contains(err.Error(), "chunks") {
			t.Errorf("size %d: %v, want a refusal naming the chunk bound", size, err)
		}
	}
	// The largest size allowed is learned (its chunk map is 16 MiB).
	_, k := randBlob(t, 10)
	if got, err := c.Open(k, Plan{Origin: sizeLiar{maxChunks * cs}}).Size(context.Background()); err != nil || got != maxChunks*cs {
		t.Fatalf("size at the bound: %d, %v", got, err)
	}
}

// An evicted blob's folder is moved aside when the blob leaves the index:
// a new entry for the same key, created before the eviction's delete runs,
// gets fresh files that the delete does not take.
func TestEvictionDoesNotTakeTheNextEntrysFiles(t *testing.T) {
	dir := t.TempDir()
	c := open(t, dir, 1<<20, nil, nil)
	src := newFake("origin", true)
	data, k := randBlob(t, 3*cs+5)
	src.blobs[k] = data
	h := c.Open(k, src.plan())
	if got := readAll(t, h); !bytes.Equal(got, data) {
		t.Fatal("first read: wrong bytes")
	}
	h.Close()
	waitFor(t, "verified", func() bool { i, _ := c.Stat(k); return i.Verified })
	waitFor(t, "no user of the blob", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.blobs[k].refs == 0
	})
	// Evict it, as Open does when over the limit; its delete runs later.
	c.mu.Lock()
	victims := c.evictLocked(c.opts.MaxBytes, nil)
	c.mu.Unlock()
	if len(victims) != 1 {
		t.Fatalf("%d victims, want 1", len(victims))
	}
	// Meanwhile a reader brings the blob back.
	h = c.Open(k, src.plan())
	if got := readAll(t, h); !bytes.Equal(got, data) {
		t.Fatal("second read: wrong bytes")
	}
	h.Close()
	waitFor(t, "verified again", func() bool { i, _ := c.Stat(k); return i.Verified })
	c.destroy(victims)
	// The new copy survives the old one's delete, on disk and across a restart.
	rc, _, err := c.OpenLocal(k, 0, -1)
	if err != nil {
		t.Fatalf("after the old copy's delete: %v", err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("after the old copy's delete: %v, equal %v", err, bytes.Equal(got, data))
	}
	c.Close()
	c = open(t, dir, 1<<20, nil, nil)
	defer c.Close()
	if i, ok := c.Stat(k); !ok || !i.Verified {
		t.Fatalf("after a restart: %+v, %v; want the verified blob", i, ok)
	}
	before := src.total()
	if got := readAll(t, c.Open(k, src.plan())); !bytes.Equal(got, data) || src.total() != before {
		t.Fatalf("after a restart: equal %v, %d new fetches", bytes.Equal(got, data), src.total()-before)
	}
}

// A caller that saw an empty blob's size as unknown, and asks for chunk 0
// after a concurrent fill learned the size 0, gets "nothing to fill"; it
// used to index past the empty chunk map while holding the entry's lock
// (a panic that left every later user of the cache waiting).
func TestEnsureOfAnEmptyBlobsChunkZero(t *testing.T) {
	// No deferred clean-up: after such a panic the entry's lock stays held.
	c := open(t, t.TempDir(), 1<<20, nil, nil)
	_, k := randBlob(t, 0)
	e := c.getEntry(k)
	e.mu.Lock()
	e.setSize(0) // what the concurrent fill did
	e.mu.Unlock()
	var pass []byte
	err := func() (err error) {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("panicked: %v", r)
			}
		}()
		pass, err = e.ensure(context.Background(), 0, Plan{}, true)
		return err
	}()
	if pass != nil || err != nil {
		t.Fatalf("ensure(0) of an empty blob: %v, %v", pass, err)
	}
	c.unref(e)
	c.Close()
}
