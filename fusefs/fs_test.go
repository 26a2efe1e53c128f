package fusefs

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/internal/testenv"
	"github.com/prometheus/client_golang/prometheus"
)

const testChunk = 64 << 10

// fakeSource serves blobs from memory. It can hang or fail on chunks at or
// after hangFrom, hold chunks at or after gateFrom until the test lets them
// through, and counts fetches per offset.
type fakeSource struct {
	mu       sync.Mutex
	blobs    map[blob.Key][]byte
	fetches  map[int64]int
	hangFrom int64         // -1: never
	hang     chan struct{} // closed to release hung fetches
	fail     bool          // fail instead of hanging
	gateFrom int64         // -1: never
	gate     chan struct{} // closed to let held fetches through, with their bytes
}

func newFakeSource() *fakeSource {
	return &fakeSource{blobs: map[blob.Key][]byte{}, fetches: map[int64]int{},
		hangFrom: -1, hang: make(chan struct{}), gateFrom: -1, gate: make(chan struct{})}
}

// breakFrom makes every fetch at or after off hang (or fail at once), from
// now on. Tests call it before the first open: the lookup fills chunk 0, and
// when its fill learns the size before the cache looks, it also starts
// read-ahead of the next chunks. Breaking the source only after the open
// would race with that read-ahead, which may already have cached the chunks
// the test expects to be unservable.
func (s *fakeSource) breakFrom(off int64, fail bool) {
	s.mu.Lock()
	s.hangFrom, s.fail = off, fail
	s.mu.Unlock()
}

// holdFrom holds every fetch at or after off until release, so the blob
// cannot complete (and verify) before the test has done what needs it
// incomplete, whatever read-ahead the cache starts meanwhile.
func (s *fakeSource) holdFrom(off int64) {
	s.mu.Lock()
	s.gateFrom = off
	s.mu.Unlock()
}

func (s *fakeSource) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.gate:
	default:
		close(s.gate)
	}
}

func (s *fakeSource) add(data []byte) blob.Key {
	sum := sha256.Sum256(data)
	k := blob.Key("sha256:" + hex.EncodeToString(sum[:]))
	s.mu.Lock()
	s.blobs[k] = data
	s.mu.Unlock()
	return k
}

func (s *fakeSource) Name() string { return "fake" }

func (s *fakeSource) Fetch(ctx context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	s.mu.Lock()
	data, ok := s.blobs[k]
	s.fetches[off]++
	hangFrom, fail := s.hangFrom, s.fail
	gateFrom, gate := s.gateFrom, s.gate
	s.mu.Unlock()
	if !ok {
		return nil, -1, fmt.Errorf("fake %s: %w", k, blob.ErrNotFound)
	}
	if gateFrom >= 0 && off >= gateFrom {
		select {
		case <-ctx.Done():
			return nil, -1, ctx.Err()
		case <-gate:
		}
	}
	if hangFrom >= 0 && off >= hangFrom {
		if fail {
			return nil, -1, errors.New("fake source: connection reset")
		}
		select {
		case <-ctx.Done():
			return nil, -1, ctx.Err()
		case <-s.hang:
			return nil, -1, errors.New("fake source: released")
		}
	}
	end := min(off+n, int64(len(data)))
	return io.NopCloser(bytes.NewReader(data[off:end])), int64(len(data)), nil
}

func (s *fakeSource) fetchCounts() map[int64]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps(s.fetches)
}

func maps(m map[int64]int) map[int64]int {
	out := make(map[int64]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

type fakeCatalog struct{ infos []cache.Info }

func (c fakeCatalog) List(context.Context) ([]cache.Info, error) { return c.infos, nil }
func (c fakeCatalog) Stat(_ context.Context, k blob.Key) (cache.Info, bool, error) {
	for _, i := range c.infos {
		if i.Key == k {
			return i, true, nil
		}
	}
	return cache.Info{}, false, nil
}

// kernelGrantsPassthrough reports whether the kernel serving f grants FUSE
// passthrough to this process, and why: Linux 6.9 or later, the kernel
// offering FUSE_PASSTHROUGH in its INIT request (CONFIG_FUSE_PASSTHROUGH),
// and CAP_SYS_ADMIN (root), which the kernel requires to register a backing
// file.
func kernelGrantsPassthrough(f *FS) (bool, string) {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		return false, fmt.Sprintf("uname: %v", err)
	}
	var rel []byte
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		rel = append(rel, byte(c))
	}
	var major, minor int
	fmt.Sscanf(string(rel), "%d.%d", &major, &minor)
	switch {
	case major < 6 || major == 6 && minor < 9:
		return false, fmt.Sprintf("kernel %s is older than 6.9", rel)
	case f.server.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH == 0:
		return false, fmt.Sprintf("kernel %s does not offer FUSE_PASSTHROUGH (CONFIG_FUSE_PASSTHROUGH off)", rel)
	case os.Geteuid() != 0:
		return false, fmt.Sprintf("kernel %s offers passthrough, but it needs CAP_SYS_ADMIN", rel)
	}
	return true, fmt.Sprintf("kernel %s offers FUSE_PASSTHROUGH", rel)
}

func needFUSE(t testing.TB) {
	t.Helper()
	testenv.NeedFUSE(t)
}

type testMount struct {
	fs    *FS
	cache *cache.Cache
	src   *fakeSource
	reg   *prometheus.Registry
	dir   string // <mountpoint>/sha256
}

func mountForTest(t testing.TB, mod func(*Options)) *testMount {
	t.Helper()
	return mountWithCache(t, nil, mod)
}

// mountWithCache is mountForTest with the cache's options adjusted too.
//
// Lookups, reads and fills are bounded by a minute, far above what any step
// needs: a chunk-0 fill syncs the blob's meta file and its directory, which
// can take seconds while other processes load the disk, and a step that
// hits its bound fails with ENOENT or EIO. Tests about a bound set their own.
func mountWithCache(t testing.TB, cmod func(*cache.Options), mod func(*Options)) *testMount {
	t.Helper()
	needFUSE(t)
	base := t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	copts := cache.Options{
		Dir: filepath.Join(base, "cache"), ChunkSize: testChunk, MaxBytes: 2 << 30,
		FillTimeout: time.Minute, Logger: log,
	}
	if cmod != nil {
		cmod(&copts)
	}
	c, err := cache.Open(copts)
	if err != nil {
		t.Fatal(err)
	}
	src := newFakeSource()
	reg := prometheus.NewRegistry()
	opts := Options{
		Mountpoint:    filepath.Join(base, "mnt", "blobs"), // created by Mount
		Cache:         c,
		Plan:          func(blob.Key, blob.Source) cache.Plan { return cache.Plan{Peers: src} },
		LookupTimeout: time.Minute,
		ReadTimeout:   time.Minute,
		BackingDir:    filepath.Join(base, "cache"),
		Logger:        log,
		Registerer:    reg,
	}
	if mod != nil {
		mod(&opts)
	}
	f, err := Mount(opts)
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := f.Close(ctx); err != nil {
			t.Errorf("close mount: %v", err)
		}
		src.mu.Lock()
		select {
		case <-src.hang:
		default:
			close(src.hang)
		}
		src.mu.Unlock()
		src.release()
		c.Close()
	})
	return &testMount{fs: f, cache: c, src: src, reg: reg, dir: filepath.Join(f.Mountpoint(), dirName)}
}

func (m *testMount) path(k blob.Key) string { return filepath.Join(m.dir, k.Hex()) }

// waitReleased waits until peerd has heard every close of k's files: the
// kernel sends RELEASE after close() returns, and until it arrives an open
// stays on the page-cache side rather than passthrough.
func (m *testMount) waitReleased(t *testing.T, k blob.Key) {
	t.Helper()
	dir := m.fs.root.GetChild(dirName)
	ch := dir.GetChild(k.Hex())
	if ch == nil {
		return
	}
	n := ch.Operations().(*blobNode)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		n.mu.Lock()
		open := n.cachedOpen + n.passOpen
		n.mu.Unlock()
		if open == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d files of %s still open 10s after close", open, k)
		}
	}
}

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

func waitVerified(t *testing.T, c *cache.Cache, k blob.Key) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if i, ok := c.Stat(k); ok && i.Verified {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s never verified", k)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func counter(t *testing.T, reg *prometheus.Registry, name, label string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) == 0 || m.GetLabel()[0].GetValue() == label {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func checkRandomReads(t *testing.T, path string, want []byte, seed uint64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := rand.New(rand.NewPCG(seed, 1))
	for i := 0; i < 200; i++ {
		off := r.Int64N(int64(len(want)))
		n := 1 + r.IntN(3*testChunk)
		buf := make([]byte, n)
		got, err := f.ReadAt(buf, off)
		if err != nil && !(errors.Is(err, io.EOF) && off+int64(n) > int64(len(want))) {
			t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
		}
		exp := want[off:min(off+int64(n), int64(len(want)))]
		if !bytes.Equal(buf[:got], exp) {
			t.Fatalf("ReadAt(%d, %d): %d bytes differ from the origin's", off, n, got)
		}
	}
}

// TestReadsMatchOrigin reads a blob the node has never seen, by digest alone:
// first lazily (random offsets, then whole), then once it is cached and
// verified, through passthrough or the spliced local path.
func TestReadsMatchOrigin(t *testing.T) {
	for _, pass := range []bool{true, false} {
		t.Run(fmt.Sprintf("passthrough=%v", pass), func(t *testing.T) {
			m := mountForTest(t, func(o *Options) { o.DisablePassthrough = !pass })
			data := randomBytes(1, 5*testChunk*7+12345)
			k := m.src.add(data)

			st, err := os.Stat(m.path(k))
			if err != nil {
				t.Fatalf("stat by digest: %v", err)
			}
			if st.Size() != int64(len(data)) || st.Mode() != 0o444 || !st.Mode().IsRegular() {
				t.Fatalf("stat: size %d mode %v, want %d -r--r--r--", st.Size(), st.Mode(), len(data))
			}
			info, _ := m.cache.Stat(k)
			if st.ModTime().Unix() != info.ModTime.Unix() {
				t.Fatalf("mtime %v, cache says %v", st.ModTime(), info.ModTime)
			}

			checkRandomReads(t, m.path(k), data, 7)
			got, err := os.ReadFile(m.path(k))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("whole-file read differs from origin (%d vs %d bytes)", len(got), len(data))
			}
			if n := counter(t, m.reg, "peerd_fuse_opens_total", "lazy"); n < 1 {
				t.Fatalf("lazy opens = %v, want ≥ 1", n)
			}

			waitVerified(t, m.cache, k)
			m.waitReleased(t, k)
			localBefore := counter(t, m.reg, "peerd_fuse_read_bytes_total", "local")
			got, err = os.ReadFile(m.path(k))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("read of the verified blob differs from origin")
			}
			checkRandomReads(t, m.path(k), data, 8)
			// Whether passthrough must be in use is decided from the kernel,
			// not from what the mount negotiated: a capable kernel that ends
			// up on the local path is a regression, not a fallback to accept.
			want, why := kernelGrantsPassthrough(m.fs)
			want = want && pass
			if m.fs.Passthrough() != want {
				t.Fatalf("mount passthrough %v, want %v (%s, DisablePassthrough %v)", m.fs.Passthrough(), want, why, !pass)
			}
			mode := "local"
			if want {
				mode = "passthrough"
			}
			t.Logf("verified reads: %s (%s)", mode, why)
			if n := counter(t, m.reg, "peerd_fuse_opens_total", mode); n < 2 {
				t.Fatalf("%s opens = %v, want ≥ 2", mode, n)
			}
			if n := counter(t, m.reg, "peerd_fuse_read_bytes_total", "local") - localBefore; want && n != 0 {
				t.Fatalf("%v bytes of a passthrough file were read through peerd", n)
			}
			for off, n := range m.src.fetchCounts() {
				if n != 1 {
					t.Errorf("chunk at %d fetched %d times, want once (reads go through the cache)", off, n)
				}
			}
		})
	}
}

func TestLookupNotFound(t *testing.T) {
	m := mountForTest(t, nil)
	known := m.src.add([]byte("hello"))
	unknown := strings.Repeat("ab", 32)
	for _, name := range []string{
		unknown,                      // well-formed, no source has it
		"hello",                      // not hex
		strings.ToUpper(known.Hex()), // upper case is not a digest
		known.Hex()[:63],             // short
		known.Hex() + "0",            // long
		"sha256:" + known.Hex(),      // prefixed
		strings.Repeat("g", 64),      // not hex
	} {
		_, err := os.Stat(filepath.Join(m.dir, name))
		if !errors.Is(err, syscall.ENOENT) {
			t.Errorf("stat %q: %v, want ENOENT", name, err)
		}
	}
	if _, err := os.Stat(m.path(known)); err != nil {
		t.Errorf("stat of a blob the source has: %v", err)
	}
	if _, err := os.Stat(filepath.Join(m.fs.Mountpoint(), "sha512")); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("stat sha512: %v, want ENOENT", err)
	}
	if n := counter(t, m.reg, "peerd_fuse_lookups_total", "invalid"); n < 6 {
		t.Errorf("invalid lookups counted %v, want ≥ 6", n)
	}
}

func TestLookupWithoutAPlan(t *testing.T) {
	m := mountForTest(t, func(o *Options) { o.Plan = nil })
	k := m.src.add([]byte("not reachable"))
	if _, err := os.Stat(m.path(k)); !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("stat with no sources: %v, want ENOENT", err)
	}
}

// TestChangesRefused checks every kind of change fails with EROFS, both on
// the kernel-read-only mount and on a writable one where peerd's own
// handlers must refuse.
func TestChangesRefused(t *testing.T) {
	for _, writable := range []bool{false, true} {
		t.Run(fmt.Sprintf("writable-mount=%v", writable), func(t *testing.T) {
			m := mountForTest(t, func(o *Options) { o.writable = writable })
			k := m.src.add(randomBytes(2, 3*testChunk))
			p := m.path(k)
			if _, err := os.Stat(p); err != nil {
				t.Fatal(err)
			}
			other := filepath.Join(m.dir, strings.Repeat("0", 64))
			ops := []struct {
				name string
				do   func() error
			}{
				{"open for write", func() error { f, err := os.OpenFile(p, os.O_WRONLY, 0); closeIf(f); return err }},
				{"open read-write", func() error { f, err := os.OpenFile(p, os.O_RDWR, 0); closeIf(f); return err }},
				{"open truncate", func() error { f, err := os.OpenFile(p, os.O_RDONLY|os.O_TRUNC, 0); closeIf(f); return err }},
				{"create", func() error { f, err := os.Create(filepath.Join(m.dir, "new")); closeIf(f); return err }},
				{"create at root", func() error { f, err := os.Create(filepath.Join(m.fs.Mountpoint(), "new")); closeIf(f); return err }},
				{"rename", func() error { return os.Rename(p, other) }},
				{"unlink", func() error { return syscall.Unlink(p) }},
				{"rmdir", func() error { return syscall.Rmdir(m.dir) }},
				{"truncate", func() error { return os.Truncate(p, 0) }},
				{"chmod", func() error { return os.Chmod(p, 0o644) }},
				{"chtimes", func() error { return os.Chtimes(p, time.Now(), time.Now()) }},
				{"mkdir", func() error { return os.Mkdir(filepath.Join(m.dir, "d"), 0o755) }},
				{"symlink", func() error { return os.Symlink(p, filepath.Join(m.dir, "l")) }},
				{"link", func() error { return os.Link(p, filepath.Join(m.dir, "h")) }},
				{"setxattr", func() error { return syscall.Setxattr(p, "user.x", []byte("1"), 0) }},
			}
			for _, op := range ops {
				if err := op.do(); !errors.Is(err, syscall.EROFS) {
					t.Errorf("%s: %v, want EROFS", op.name, err)
				}
			}
			if writable {
				for _, op := range []string{"open-write", "create", "rename", "unlink", "setattr", "mkdir", "symlink"} {
					n := counter(t, m.reg, "peerd_fuse_refused_changes_total", op)
					if n == 0 {
						t.Errorf("no %s reached peerd's handler on the writable mount", op)
					}
				}
			}
			got, err := os.ReadFile(p)
			if err != nil || len(got) != 3*testChunk {
				t.Fatalf("blob changed after refused writes: %d bytes, %v", len(got), err)
			}
		})
	}
}

func closeIf(f *os.File) {
	if f != nil {
		f.Close()
	}
}

// readGuarded runs a read in the background and fails the test if it does
// not return at all: the bound is what is under test, not a wall time.
func readGuarded(t *testing.T, f *os.File, off int64, n int) (int, error) {
	t.Helper()
	type res struct {
		n   int
		err error
	}
	ch := make(chan res, 1)
	go func() {
		buf := make([]byte, n)
		got, err := f.ReadAt(buf, off)
		ch <- res{got, err}
	}()
	select {
	case r := <-ch:
		return r.n, r.err
	case <-time.After(2 * time.Minute):
		t.Fatalf("read at %d hung", off)
		return 0, nil
	}
}

func TestReadFailsWithEIO(t *testing.T) {
	for _, mode := range []string{"hang", "fail"} {
		t.Run(mode, func(t *testing.T) {
			m := mountForTest(t, func(o *Options) { o.ReadTimeout = time.Second })
			data := randomBytes(3, 10*testChunk)
			k := m.src.add(data)
			m.src.breakFrom(4*testChunk, mode == "fail")
			f, err := os.Open(m.path(k)) // resolves the size from chunk 0
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := readGuarded(t, f, 6*testChunk, 4096); !errors.Is(err, syscall.EIO) {
				t.Fatalf("read past a %s source: %v, want EIO", mode, err)
			}
			if n := counter(t, m.reg, "peerd_fuse_read_errors_total", ""); n == 0 {
				t.Fatal("read error not counted")
			}
			// Bytes the source still serves read fine on the same file.
			buf := make([]byte, 100)
			if _, err := f.ReadAt(buf, 10); err != nil || !bytes.Equal(buf, data[10:110]) {
				t.Fatalf("read of a servable range after EIO: %v", err)
			}
		})
	}
}

func TestConcurrentReaders(t *testing.T) {
	m := mountForTest(t, nil)
	data := randomBytes(4, 40*testChunk+77)
	k := m.src.add(data)
	want := sha256.Sum256(data)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			f, err := os.Open(m.path(k))
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			h := sha256.New()
			// Different buffer sizes and starting points mix sequential and
			// overlapping reads of the same chunks.
			if i%2 == 1 {
				off := int64(i) * testChunk
				sec := io.NewSectionReader(f, off, int64(len(data))-off)
				if _, err := io.CopyBuffer(io.Discard, sec, make([]byte, 4096*(i+1))); err != nil {
					errs <- err
					return
				}
			}
			if _, err := io.CopyBuffer(h, io.NewSectionReader(f, 0, int64(len(data))), make([]byte, 4096*(i+1))); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(h.Sum(nil), want[:]) {
				errs <- fmt.Errorf("reader %d: content differs from origin", i)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for off, n := range m.src.fetchCounts() {
		if n != 1 {
			t.Errorf("chunk at %d fetched %d times by 16 readers, want once", off, n)
		}
	}
}

func TestReaddir(t *testing.T) {
	cat := fakeCatalog{}
	var catKey blob.Key
	m := mountForTest(t, func(o *Options) {
		sum := sha256.Sum256([]byte("in containerd"))
		catKey = blob.Key("sha256:" + hex.EncodeToString(sum[:]))
		cat.infos = []cache.Info{
			{Key: catKey, Size: 13, ModTime: time.Unix(1700000000, 0)},
			{Key: blob.Key("url:" + strings.Repeat("1", 64)), Size: 3}, // never listed
		}
		o.Catalogs = []Catalog{cat}
	})
	full := m.src.add(randomBytes(5, 2*testChunk))
	partial := m.src.add(randomBytes(6, 9*testChunk))
	if _, err := os.ReadFile(m.path(full)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(m.path(partial)); err != nil { // fills chunk 0 only
		t.Fatal(err)
	}
	// The lookup returns once the source told the size; chunk 0 lands
	// just after.
	waitFor(t, "chunk 0 of the partial blob stored", func() bool { i, _ := m.cache.Stat(partial); return i.Present > 0 })
	ents, err := os.ReadDir(m.dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
		if !e.Type().IsRegular() {
			t.Errorf("%s: type %v, want regular file", e.Name(), e.Type())
		}
	}
	want := []string{full.Hex(), partial.Hex(), catKey.Hex()}
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Fatalf("readdir = %v, want %v", names, want)
	}
	st, err := os.Stat(m.path(catKey))
	if err != nil || st.Size() != 13 || st.ModTime().Unix() != 1700000000 {
		t.Fatalf("stat of a catalog blob: %v %v", st, err)
	}
	root, err := os.ReadDir(m.fs.Mountpoint())
	if err != nil || len(root) != 1 || root[0].Name() != "sha256" || !root[0].IsDir() {
		t.Fatalf("root lists %v (%v), want only sha256/", root, err)
	}
}

// TestCloseUnblocksReaders unmounts while a reader waits on a source that
// never answers: the read ends with EIO and the mount leaves the namespace.
func TestCloseUnblocksReaders(t *testing.T) {
	// Without read-ahead only the reader below fetches chunk 5, so seeing
	// that fetch means its request is parked in peerd, not still on its way.
	m := mountWithCache(t, func(o *cache.Options) { o.ReadAhead = -1 },
		func(o *Options) { o.ReadTimeout = 10 * time.Minute })
	k := m.src.add(randomBytes(7, 8*testChunk))
	m.src.breakFrom(2*testChunk, false)
	f, err := os.Open(m.path(k))
	if err != nil {
		t.Fatal(err)
	}
	readErr := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		_, err := f.ReadAt(buf, 5*testChunk)
		f.Close()
		readErr <- err
	}()
	// Wait until the read is parked on the source.
	for deadline := time.Now().Add(time.Minute); ; {
		if m.src.fetchCounts()[5*testChunk] > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("read never reached the source")
		}
		time.Sleep(5 * time.Millisecond)
	}
	closed := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		closed <- m.fs.Close(ctx)
	}()
	select {
	case err := <-readErr:
		if !errors.Is(err, syscall.EIO) && !errors.Is(err, syscall.ENOTCONN) {
			t.Errorf("blocked read ended with %v, want EIO", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("blocked read never returned after unmount")
	}
	if err := <-closed; err != nil {
		t.Fatalf("close: %v", err)
	}
	if typ, ok := mountedAt(m.fs.Mountpoint()); ok {
		t.Fatalf("still mounted (%s) after close", typ)
	}
}

// TestStaleMountCleared kills a process holding a mount (as a crash would)
// and mounts again on the same path.
func TestStaleMountCleared(t *testing.T) {
	needFUSE(t)
	base := t.TempDir()
	mp := filepath.Join(base, "mnt")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "PEERD_FUSEFS_HELPER="+base)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "mounted" {
		t.Fatalf("helper did not mount: %q %v", line, err)
	}
	if _, ok := mountedAt(mp); !ok {
		t.Fatal("helper's mount not in mountinfo")
	}
	// A live mount is refused, not stolen.
	c, err := cache.Open(cache.Options{Dir: filepath.Join(base, "cache2"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if f, err := Mount(Options{Mountpoint: mp, Cache: c}); err == nil {
		f.Close(context.Background())
		t.Fatal("mounted over a live mount")
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(mp, &sfs); !isStale(err) {
		t.Fatalf("after kill -9 the mount should be stale; statfs: %v", err)
	}
	f, err := Mount(Options{Mountpoint: mp, Cache: c, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatalf("mount over a stale mount: %v", err)
	}
	if _, err := os.ReadDir(filepath.Join(mp, dirName)); err != nil {
		t.Errorf("readdir after recovery: %v", err)
	}
	if err := f.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, ok := mountedAt(mp); ok {
		t.Fatal("mount left behind")
	}
}

func TestMain(m *testing.M) {
	if base := os.Getenv("PEERD_FUSEFS_HELPER"); base != "" {
		helperMount(base)
		return
	}
	os.Exit(m.Run())
}

// helperMount mounts and waits to be killed.
func helperMount(base string) {
	c, err := cache.Open(cache.Options{Dir: filepath.Join(base, "cache"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if _, err := Mount(Options{Mountpoint: filepath.Join(base, "mnt"), Cache: c}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("mounted")
	select {}
}

// TestOpenModesDoNotConflict: the kernel refuses a passthrough open while a
// file of the same inode is open through the page cache (and the other way
// round). A file opened lazily stays open while the blob completes and
// verifies; later opens must still succeed and read the right bytes, and
// once everything is closed the next open may use passthrough.
func TestOpenModesDoNotConflict(t *testing.T) {
	m := mountForTest(t, nil)
	data := randomBytes(9, 6*testChunk+5)
	k := m.src.add(data)
	// The first open must find the blob incomplete. The lookup fills chunk 0
	// and may start read-ahead of the rest; held at the source, it cannot
	// complete the blob before the open.
	m.src.holdFrom(testChunk)
	lazy, err := os.Open(m.path(k))
	if err != nil {
		t.Fatal(err)
	}
	defer lazy.Close()
	if n := counter(t, m.reg, "peerd_fuse_opens_total", "lazy"); n != 1 {
		t.Fatalf("lazy opens = %v, want 1 (the blob was incomplete at the first open)", n)
	}
	m.src.release()
	if got, err := io.ReadAll(lazy); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("lazy read: %v", err)
	}
	waitVerified(t, m.cache, k)
	second, err := os.Open(m.path(k))
	if err != nil {
		t.Fatalf("open while a lazy file is open on a now verified blob: %v", err)
	}
	defer second.Close()
	if got, err := io.ReadAll(second); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("second read: %v", err)
	}
	lazy.Close()
	second.Close()
	m.waitReleased(t, k)
	if n := counter(t, m.reg, "peerd_fuse_opens_total", "local"); n != 1 {
		t.Fatalf("local opens = %v, want 1 (the open that overlapped the lazy one)", n)
	}

	// Everything closed: passthrough if the kernel has it. Two overlapping
	// opens and an mmap, as a model loader would do.
	var files []*os.File
	for i := 0; i < 2; i++ {
		f, err := os.Open(m.path(k))
		if err != nil {
			t.Fatalf("open %d after all closed: %v", i, err)
		}
		defer f.Close()
		files = append(files, f)
	}
	mem, err := syscall.Mmap(int(files[0].Fd()), 0, len(data), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap: %v", err)
	}
	defer syscall.Munmap(mem)
	if !bytes.Equal(mem, data) {
		t.Fatal("mmap of the blob differs from origin")
	}
	if got, err := io.ReadAll(files[1]); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read next to the mmap: %v", err)
	}
	if m.fs.Passthrough() {
		if n := counter(t, m.reg, "peerd_fuse_opens_total", "passthrough"); n != 2 {
			t.Fatalf("passthrough opens = %v, want 2", n)
		}
	}
}

// TestLookupBoundedBySlowSource: a source that never answers makes the
// lookup answer ENOENT once the lookup timeout passes, not hang the caller.
func TestLookupBoundedBySlowSource(t *testing.T) {
	m := mountForTest(t, func(o *Options) { o.LookupTimeout = 300 * time.Millisecond })
	k := m.src.add([]byte("slow"))
	m.src.mu.Lock()
	m.src.hangFrom = 0
	m.src.mu.Unlock()
	errc := make(chan error, 1)
	go func() { _, err := os.Stat(m.path(k)); errc <- err }()
	select {
	case err := <-errc:
		if !errors.Is(err, syscall.ENOENT) {
			t.Fatalf("stat with a hanging source: %v, want ENOENT", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("lookup hung on a source that never answers")
	}
	if n := counter(t, m.reg, "peerd_fuse_lookups_total", "not_found"); n != 1 {
		t.Fatalf("not_found lookups = %v, want 1", n)
	}
}

// TestEvictionAndPinning: an open file pins its blob against eviction; once
// closed the blob may be evicted, and the same path then reads it again
// through the sources.
func TestEvictionAndPinning(t *testing.T) {
	needFUSE(t)
	base := t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	c, err := cache.Open(cache.Options{Dir: filepath.Join(base, "cache"), ChunkSize: testChunk, MaxBytes: 12 * testChunk, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	src := newFakeSource()
	f, err := Mount(Options{Mountpoint: filepath.Join(base, "mnt"), Cache: c, Logger: log,
		Plan: func(blob.Key, blob.Source) cache.Plan { return cache.Plan{Peers: src} }})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close(context.Background())
	path := func(k blob.Key) string { return filepath.Join(f.Mountpoint(), dirName, k.Hex()) }
	a := randomBytes(10, 8*testChunk)
	b := randomBytes(11, 8*testChunk)
	ka, kb := src.add(a), src.add(b)

	fa, err := os.Open(path(ka))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := io.ReadAll(fa); err != nil || !bytes.Equal(got, a) {
		t.Fatalf("read A: %v", err)
	}
	// A is open: reading B cannot evict it (B's chunks pass through).
	if got, err := os.ReadFile(path(kb)); err != nil || !bytes.Equal(got, b) {
		t.Fatalf("read B while A is open: %v", err)
	}
	if i, ok := c.Stat(ka); !ok || !i.Complete {
		t.Fatalf("A lost bytes while open: %+v", i)
	}
	fa.Close()
	waitGone := func(k blob.Key) bool {
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			// Reading B again makes room by evicting A once nothing pins it.
			if got, err := os.ReadFile(path(kb)); err != nil || !bytes.Equal(got, b) {
				t.Fatalf("read B: %v", err)
			}
			if i, ok := c.Stat(k); !ok || i.Present < int64(len(a)) {
				return true
			}
		}
		return false
	}
	if !waitGone(ka) {
		t.Fatal("A was never evicted after its file closed")
	}
	before := src.fetchCounts()[0]
	if got, err := os.ReadFile(path(ka)); err != nil || !bytes.Equal(got, a) {
		t.Fatalf("read A after eviction: %v", err)
	}
	if src.fetchCounts()[0] == before {
		t.Fatal("A was read after eviction without fetching it again")
	}
}
