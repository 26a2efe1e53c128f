package httpmirror

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/upstream"
	"github.com/prometheus/client_golang/prometheus"
)

// hitFixture is a node whose cache holds one complete, verified blob that it
// filled from a local origin through /blobs/.
type hitFixture struct {
	c        *cache.Cache
	reg      *prometheus.Registry
	handler  http.Handler
	srv      *httptest.Server
	data     []byte
	key      blob.Key
	blobsURL string // path and query of the /blobs/ request
	v2URL    string
}

func newHitFixture(tb testing.TB, size int) *hitFixture {
	tb.Helper()
	data := make([]byte, size)
	rand.Read(data)
	key := keyOf(data)
	originPath := "/v2/r/blobs/" + string(key)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != originPath {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
	}))
	tb.Cleanup(origin.Close)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	reg := prometheus.NewRegistry()
	c, err := cache.Open(cache.Options{Dir: tb.TempDir(), ChunkSize: 1 << 20, Logger: log, Registerer: reg})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	ou, _ := url.Parse(origin.URL)
	allow, err := upstream.ParseAllowList([]string{ou.Host})
	if err != nil {
		tb.Fatal(err)
	}
	oci := NewOCI(OCIConfig{Cache: c, Logger: log, Registry: reg})
	h := New(Config{Cache: c, Upstream: upstream.NewClient(upstream.Options{Logger: log}), Allow: allow, OCI: oci,
		Logger: log, Registry: reg, Gatherer: reg})
	srv := httptest.NewServer(h)
	tb.Cleanup(srv.Close)
	fx := &hitFixture{c: c, reg: reg, handler: h, srv: srv, data: data, key: key,
		blobsURL: "/blobs/" + origin.URL + originPath, v2URL: "/v2/bench/blobs/" + string(key)}
	resp, body := fx.get(tb, fx.blobsURL)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
		tb.Fatalf("fill: %s, %d bytes", resp.Status, len(body))
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if i, ok := c.Stat(key); ok && i.Verified && i.Complete {
			break
		}
		if time.Now().After(deadline) {
			tb.Fatal("blob never verified")
		}
		time.Sleep(5 * time.Millisecond)
	}
	origin.Close() // from here on only the cache has it
	return fx
}

func (fx *hitFixture) get(tb testing.TB, path string, hdr ...string) (*http.Response, []byte) {
	tb.Helper()
	return fx.do(tb, http.MethodGet, path, hdr...)
}

func (fx *hitFixture) do(tb testing.TB, method, path string, hdr ...string) (*http.Response, []byte) {
	tb.Helper()
	req, err := http.NewRequest(method, fx.srv.URL+path, nil)
	if err != nil {
		tb.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := fx.srv.Client().Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatal(err)
	}
	return resp, body
}

func (fx *hitFixture) counter(tb testing.TB, name, label, value string) float64 {
	tb.Helper()
	mfs, err := fx.reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// settled waits (a little) for a counter to reach want and returns its value.
func (fx *hitFixture) settled(tb testing.TB, name, label, value string, want float64) float64 {
	tb.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		v := fx.counter(tb, name, label, value)
		if v >= want || time.Now().After(deadline) {
			return v
		}
		time.Sleep(time.Millisecond)
	}
}

// A complete blob is answered like before the fast path: status, headers,
// bytes, and each served byte counted once as a cache hit.
func TestServeCompleteBlob(t *testing.T) {
	const size = 3<<20 + 12345 // not a whole number of chunks
	fx := newHitFixture(t, size)
	sz := strconv.Itoa(size)
	for _, route := range []struct{ name, path string }{{"blobs", fx.blobsURL}, {"v2", fx.v2URL}} {
		t.Run(route.name, func(t *testing.T) {
			for _, tc := range []struct {
				rng      string
				status   int
				off, n   int
				crange   string
				withBody bool
			}{
				{"", 200, 0, size, "", true},
				{"bytes=0-0", 206, 0, 1, "bytes 0-0/" + sz, true},
				{"bytes=1048570-2097160", 206, 1048570, 1048591, "bytes 1048570-2097160/" + sz, true},
				{"bytes=3000000-", 206, 3000000, size - 3000000, fmt.Sprintf("bytes 3000000-%d/%s", size-1, sz), true},
				{"bytes=-100", 206, size - 100, 100, fmt.Sprintf("bytes %d-%d/%s", size-100, size-1, sz), true},
				{"bytes=" + sz + "-", 416, 0, 0, "bytes */" + sz, false},
			} {
				hitsBefore := fx.counter(t, "peerd_cache_read_bytes_total", "result", "hit")
				servedBefore := fx.counter(t, "peerd_served_bytes_total", "route", route.name)
				var hdr []string
				if tc.rng != "" {
					hdr = []string{"Range", tc.rng}
				}
				resp, body := fx.get(t, route.path, hdr...)
				if resp.StatusCode != tc.status {
					t.Fatalf("Range %q: %s, want %d (%s)", tc.rng, resp.Status, tc.status, body)
				}
				if got := resp.Header.Get("Content-Range"); got != tc.crange {
					t.Errorf("Range %q: Content-Range %q, want %q", tc.rng, got, tc.crange)
				}
				if !tc.withBody {
					continue
				}
				if !bytes.Equal(body, fx.data[tc.off:tc.off+tc.n]) {
					t.Fatalf("Range %q: %d bytes, not the blob's [%d, %d)", tc.rng, len(body), tc.off, tc.off+tc.n)
				}
				if got := resp.Header.Get("Content-Length"); got != strconv.Itoa(tc.n) {
					t.Errorf("Range %q: Content-Length %q, want %d", tc.rng, got, tc.n)
				}
				if got := resp.Header.Get("Docker-Content-Digest"); got != string(fx.key) {
					t.Errorf("Range %q: Docker-Content-Digest %q", tc.rng, got)
				}
				if got := resp.Header.Get("Content-Type"); got != "application/octet-stream" {
					t.Errorf("Range %q: Content-Type %q", tc.rng, got)
				}
				// Both are counted when the copy returns, which may be after
				// the client has the last byte.
				if got := fx.settled(t, "peerd_cache_read_bytes_total", "result", "hit", hitsBefore+float64(tc.n)) - hitsBefore; got != float64(tc.n) {
					t.Errorf("Range %q: cache hit bytes +%v, want +%d", tc.rng, got, tc.n)
				}
				if got := fx.settled(t, "peerd_served_bytes_total", "route", route.name, servedBefore+float64(tc.n)) - servedBefore; got != float64(tc.n) {
					t.Errorf("Range %q: served bytes +%v, want +%d", tc.rng, got, tc.n)
				}
			}
			resp, body := fx.do(t, http.MethodHead, route.path)
			if resp.StatusCode != 200 || len(body) != 0 || resp.Header.Get("Content-Length") != sz {
				t.Errorf("HEAD: %s, Content-Length %q, %d body bytes", resp.Status, resp.Header.Get("Content-Length"), len(body))
			}
		})
	}
}

// sendfileRecorder is a ResponseWriter that, like net/http's, can take the
// body through ReadFrom; it records what reached it and how.
type sendfileRecorder struct {
	hdr     http.Header
	status  int
	written int          // bytes that came through Write
	sources []io.Reader  // what ReadFrom was handed
	body    bytes.Buffer // everything
}

func (r *sendfileRecorder) Header() http.Header { return r.hdr }
func (r *sendfileRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
}
func (r *sendfileRecorder) Write(p []byte) (int, error) {
	r.WriteHeader(http.StatusOK)
	r.written += len(p)
	return r.body.Write(p)
}
func (r *sendfileRecorder) ReadFrom(src io.Reader) (int64, error) {
	r.WriteHeader(http.StatusOK)
	r.sources = append(r.sources, src)
	return io.Copy(&r.body, src)
}

// The whole body of a complete blob reaches the ResponseWriter's ReadFrom as
// an *os.File under an io.LimitedReader, in one call: the shape net/http and
// the TCP connection turn into sendfile. A wrapper that hid ReadFrom (or a
// chunk-by-chunk copy) would show up here as Write calls or several sources.
func TestServeCompleteBlobReachesSendfile(t *testing.T) {
	const size = 5<<20 + 7
	fx := newHitFixture(t, size)
	for _, tc := range []struct{ name, path, rng string }{
		{"blobs whole", fx.blobsURL, ""},
		{"blobs range", fx.blobsURL, "bytes=1000-4200000"},
		{"v2 whole", fx.v2URL, ""},
		{"v2 range", fx.v2URL, "bytes=-3000000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(http.MethodGet, tc.path, nil)
			req.RequestURI = tc.path
			if tc.rng != "" {
				req.Header.Set("Range", tc.rng)
			}
			rec := &sendfileRecorder{hdr: http.Header{}}
			fx.handler.ServeHTTP(rec, req)
			if rec.status != 200 && rec.status != 206 {
				t.Fatalf("status %d: %s", rec.status, rec.body.String())
			}
			if rec.written != 0 {
				t.Errorf("%d bytes went through Write instead of ReadFrom", rec.written)
			}
			if len(rec.sources) != 1 {
				t.Fatalf("ReadFrom called %d times, want once", len(rec.sources))
			}
			lr, ok := rec.sources[0].(*io.LimitedReader)
			if !ok {
				t.Fatalf("ReadFrom got %T, want *io.LimitedReader", rec.sources[0])
			}
			if _, ok := lr.R.(*os.File); !ok {
				t.Fatalf("ReadFrom got a LimitedReader over %T, want *os.File", lr.R)
			}
			n, _ := strconv.Atoi(rec.hdr.Get("Content-Length"))
			if rec.body.Len() != n {
				t.Errorf("body %d bytes, Content-Length %d", rec.body.Len(), n)
			}
		})
	}
}

// A blob being served stays pinned: it cannot be removed (nor evicted) until
// the response is done, and the client gets every byte.
func TestServeCompleteBlobPinnedWhileServing(t *testing.T) {
	const size = 48 << 20 // more than the loopback socket buffers hold
	fx := newHitFixture(t, size)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fx.srv.URL+fx.blobsURL, nil)
	resp, err := fx.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	head := make([]byte, 4096)
	if _, err := io.ReadFull(resp.Body, head); err != nil {
		t.Fatal(err)
	}
	// The handler is blocked in the copy: the client reads no more.
	if fx.c.Remove(fx.key) {
		t.Fatal("blob removed while a response was reading it")
	}
	rest, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(append(head, rest...), fx.data) {
		t.Fatalf("body of %d bytes differs from the blob", len(head)+len(rest))
	}
	// Once the handler has returned, the blob is no longer pinned.
	deadline := time.Now().Add(10 * time.Second)
	for !fx.c.Remove(fx.key) {
		if time.Now().After(deadline) {
			t.Fatal("blob still pinned after the response finished")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// BenchmarkServeHit compares serving a complete, verified blob from the
// cache with http.FileServer serving the cache's own data file, over
// loopback: whole 64 MiB GETs and 16 KiB ranges (where per-request costs
// show). Compare ns/op and allocs/op between the pairs:
//
//	go test -run '^$' -bench ServeHit -benchmem ./httpmirror/
func BenchmarkServeHit(b *testing.B) {
	const size = 64 << 20
	fx := newHitFixture(b, size)
	lr, _, err := fx.c.OpenLocal(fx.key, 0, -1)
	if err != nil {
		b.Fatal(err)
	}
	dataFile := lr.File().Name()
	lr.Close()
	plain := httptest.NewServer(http.FileServer(http.Dir(filepath.Dir(dataFile))))
	defer plain.Close()
	plainURL := plain.URL + "/" + filepath.Base(dataFile)
	client := &http.Client{Transport: &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 4}}
	defer client.CloseIdleConnections()
	buf := make([]byte, 256<<10)
	get := func(b *testing.B, u string, off, n int64) {
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		if n < size {
			req.Header.Set("Range", "bytes="+strconv.FormatInt(off, 10)+"-"+strconv.FormatInt(off+n-1, 10))
		}
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		// Plain reads into buf: io.Discard's ReadFrom would read 8 KiB at a time.
		got, err := io.CopyBuffer(struct{ io.Writer }{io.Discard}, struct{ io.Reader }{resp.Body}, buf)
		resp.Body.Close()
		if err != nil || got != n {
			b.Fatalf("%s: %d bytes, %v", resp.Status, got, err)
		}
	}
	for _, tc := range []struct {
		name string
		n    int64
	}{{"whole", size}, {"16KiB", 16 << 10}} {
		for _, side := range []struct{ name, url string }{{"peerd", fx.srv.URL + fx.blobsURL}, {"fileserver", plainURL}} {
			b.Run(tc.name+"/"+side.name, func(b *testing.B) {
				b.SetBytes(tc.n)
				b.ReportAllocs()
				var off int64
				for b.Loop() {
					get(b, side.url, off, tc.n)
					off = (off + tc.n) % (size - tc.n + 1)
				}
			})
		}
	}
}
