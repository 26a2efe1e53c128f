package itest

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// storagePath is where a registry's storage keeps a blob, with the "//" that
// real storage URLs carry.
func storagePath(digest string) string {
	hex := strings.TrimPrefix(digest, "sha256:")
	return "/acct//docker/registry/v2/blobs/sha256/" + hex[:2] + "/" + hex + "/data"
}

func TestBlobsProxyBytesRangesAndCache(t *testing.T) {
	origin := NewOrigin(t, "")
	data, dg := RandomBlob(t, 5<<20+12345)
	url := origin.Put(storagePath(dg), data) + "?se=2030&sig=SECRET%2Fsig"
	n := StartNode(t, NodeOpts{Args: []string{"--upstream-allow", origin.Host, "--chunk-size", "1MiB"}})
	blobURL := n.URL("/blobs/" + url)

	// HEAD: whole size, no body.
	code, hdr, body := Get(t, "HEAD", blobURL, nil)
	if code != 200 || hdr.Get("Content-Length") != strconv.Itoa(len(data)) || len(body) != 0 {
		t.Fatalf("HEAD: %d len=%s body=%d", code, hdr.Get("Content-Length"), len(body))
	}
	if got := hdr.Get("Docker-Content-Digest"); got != dg {
		t.Fatalf("HEAD digest %q, want %s", got, dg)
	}
	size := int64(len(data))
	for _, tc := range []struct {
		rng      string
		off, end int64 // inclusive end
	}{
		{"bytes=0-0", 0, 0},
		{"bytes=100-2000000", 100, 2000000},
		{"bytes=-10", size - 10, size - 1},
		{"bytes=5000000-", 5000000, size - 1},
		{"bytes=1048575-1048576", 1048575, 1048576}, // across a chunk boundary
		{"bytes=5000000-999999999", 5000000, size - 1},
	} {
		code, hdr, body := Get(t, "GET", blobURL, map[string]string{"Range": tc.rng})
		if code != 206 {
			t.Fatalf("%s: status %d: %s", tc.rng, code, body)
		}
		if want := fmt.Sprintf("bytes %d-%d/%d", tc.off, tc.end, size); hdr.Get("Content-Range") != want {
			t.Fatalf("%s: Content-Range %q, want %q", tc.rng, hdr.Get("Content-Range"), want)
		}
		if !bytes.Equal(body, data[tc.off:tc.end+1]) {
			t.Fatalf("%s: wrong bytes", tc.rng)
		}
	}
	code, hdr, _ = Get(t, "GET", blobURL, map[string]string{"Range": fmt.Sprintf("bytes=%d-", size)})
	if code != http.StatusRequestedRangeNotSatisfiable || hdr.Get("Content-Range") != fmt.Sprintf("bytes */%d", size) {
		t.Fatalf("range past the end: %d %q", code, hdr.Get("Content-Range"))
	}
	code, _, body = Get(t, "GET", blobURL, nil)
	if code != 200 || !bytes.Equal(body, data) {
		t.Fatalf("whole blob: status %d, equal %v", code, bytes.Equal(body, data))
	}
	// The origin sent each byte about once (chunk-aligned fills, no re-reads).
	if sent := origin.Sent.Load(); sent > size+size/10 {
		t.Fatalf("origin sent %d bytes for a %d-byte blob", sent, size)
	}
	waitMetric(t, n, "peerd_cache_verifications_total", 1, "result=ok")

	// A second read costs the origin nothing, with another signature too.
	origin.Sent.Store(0)
	origin.Requests.Store(0)
	other := n.URL("/blobs/" + origin.URL + storagePath(dg) + "?sig=OTHER")
	if code, _, body := Get(t, "GET", other, nil); code != 200 || !bytes.Equal(body, data) {
		t.Fatalf("cached read: %d", code)
	}
	if origin.Requests.Load() != 0 {
		t.Fatalf("cache hit sent %d requests to the origin", origin.Requests.Load())
	}
	// ...and after a restart.
	n.Restart()
	if code, _, body := Get(t, "GET", blobURL, map[string]string{"Range": "bytes=3000000-3000099"}); code != 206 || !bytes.Equal(body, data[3000000:3000100]) {
		t.Fatalf("read after restart: %d", code)
	}
	if origin.Requests.Load() != 0 {
		t.Fatalf("after restart the origin got %d requests", origin.Requests.Load())
	}
	if strings.Contains(n.Log(), "SECRET") {
		t.Fatal("the URL's signature appears in the log")
	}
}

func TestBlobsProxyRefusesWhatItShould(t *testing.T) {
	allowed := NewOrigin(t, "")
	forbidden := NewOrigin(t, "127.0.0.2")
	data, dg := RandomBlob(t, 1000)
	allowed.Put("/f", data)
	forbidden.Put("/f", data)
	n := StartNode(t, NodeOpts{Args: []string{"--upstream-allow", allowed.Host}})
	for _, tc := range []struct {
		path string
		code int
	}{
		{"/blobs/" + forbidden.URL + "/f", 403},
		{"/blobs/" + forbidden.URL + "/f?h=" + allowed.Host, 403},
		{"/blobs/http://169.254.169.254/latest/meta-data", 403},
		{"/blobs/ftp://" + allowed.Host + "/f", 400},
		{"/blobs/not-a-url", 400},
		{"/blobs/http://user:pw@" + allowed.Host + "/f", 400},
		{"/blobs/" + allowed.URL + "/missing", 404},
	} {
		code, _, body := Get(t, "GET", n.URL(tc.path), nil)
		if code != tc.code {
			t.Errorf("GET %s: %d (%s), want %d", tc.path, code, strings.TrimSpace(string(body)), tc.code)
		}
		if tc.code == 403 && len(body) == 0 {
			t.Errorf("GET %s: 403 without a reason", tc.path)
		}
	}
	if forbidden.Requests.Load() != 0 {
		t.Fatalf("a forbidden origin was contacted %d times", forbidden.Requests.Load())
	}
	req, _ := http.NewRequest("POST", n.URL("/blobs/"+allowed.URL+"/f"), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 405 {
		t.Fatalf("POST: %v %v", err, resp)
	}
	resp.Body.Close()
	_ = dg
}

func TestBlobsProxyForwardsOnlyRangeAndAuthorization(t *testing.T) {
	origin := NewOrigin(t, "")
	data, _ := RandomBlob(t, 3000)
	origin.Put("/f", data)
	n := StartNode(t, NodeOpts{Args: []string{"--upstream-allow", origin.Host}})
	code, _, body := Get(t, "GET", n.URL("/blobs/"+origin.URL+"/f"), map[string]string{
		"Authorization": "Bearer TOKEN", "Cookie": "session=1", "X-Custom": "x", "Range": "bytes=0-9",
	})
	if code != 206 || !bytes.Equal(body, data[:10]) {
		t.Fatalf("status %d", code)
	}
	h := origin.LastHeaders()
	if h.Get("Authorization") != "Bearer TOKEN" {
		t.Fatal("Authorization did not reach the origin")
	}
	if h.Get("Cookie") != "" || h.Get("X-Custom") != "" {
		t.Fatalf("client headers leaked to the origin: %v", h)
	}
	if strings.Contains(n.Log(), "TOKEN") {
		t.Fatal("the token appears in the log")
	}
}

func TestBlobsProxyURLKeysIgnoreQueryAndOriginsWithoutRange(t *testing.T) {
	origin := NewOrigin(t, "")
	origin.IgnoreRange.Store(true)
	data, _ := RandomBlob(t, 3<<20+5)
	origin.Put("/model.bin", data)
	n := StartNode(t, NodeOpts{Args: []string{"--upstream-allow", origin.Host}})
	code, _, body := Get(t, "GET", n.URL("/blobs/"+origin.URL+"/model.bin?sig=1"), map[string]string{"Range": "bytes=2097152-2097161"})
	if code != 206 || !bytes.Equal(body, data[2097152:2097162]) {
		t.Fatalf("range from an origin that ignores Range: %d", code)
	}
	Get(t, "GET", n.URL("/blobs/"+origin.URL+"/model.bin?sig=1"), nil)
	origin.Requests.Store(0)
	code, _, body = Get(t, "GET", n.URL("/blobs/"+origin.URL+"/model.bin?sig=2"), nil)
	if code != 200 || !bytes.Equal(body, data) {
		t.Fatalf("whole: %d", code)
	}
	if origin.Requests.Load() != 0 {
		t.Fatal("a different query string missed the cache")
	}
}

func TestBlobsProxyDiscardsBytesThatFailVerification(t *testing.T) {
	origin := NewOrigin(t, "")
	data, dg := RandomBlob(t, 2<<20)
	bad := append([]byte(nil), data...)
	bad[12345] ^= 1
	origin.Put(storagePath(dg), bad)
	n := StartNode(t, NodeOpts{Args: []string{"--upstream-allow", origin.Host}})
	Get(t, "GET", n.URL("/blobs/"+origin.URL+storagePath(dg)), nil)
	waitMetric(t, n, "peerd_cache_verifications_total", 1, "result=mismatch")
	// Nothing is kept: the next read goes to the origin again.
	origin.Requests.Store(0)
	Get(t, "GET", n.URL("/blobs/"+origin.URL+storagePath(dg)), map[string]string{"Range": "bytes=0-9"})
	if origin.Requests.Load() == 0 {
		t.Fatal("a blob that failed verification was served from the cache")
	}
}

func TestBlobsProxyPrefetch(t *testing.T) {
	origin := NewOrigin(t, "")
	data, dg := RandomBlob(t, 8<<20)
	origin.Put(storagePath(dg), data)
	n := StartNode(t, NodeOpts{Args: []string{"--upstream-allow", origin.Host, "--prefetch", "--prefetch-workers", "3"}})
	u := n.URL("/blobs/" + origin.URL + storagePath(dg))
	if code, _, _ := Get(t, "GET", u, map[string]string{"Range": "bytes=0-0"}); code != 206 {
		t.Fatalf("status %d", code)
	}
	waitMetric(t, n, "peerd_cache_verifications_total", 1, "result=ok")
	if sent := origin.Sent.Load(); sent < int64(len(data)) || sent > int64(len(data))*11/10 {
		t.Fatalf("prefetch made the origin send %d bytes for %d", sent, len(data))
	}
	origin.Requests.Store(0)
	if code, _, body := Get(t, "GET", u, nil); code != 200 || !bytes.Equal(body, data) {
		t.Fatal("wrong bytes after prefetch")
	}
	if origin.Requests.Load() != 0 {
		t.Fatal("prefetched blob not served from cache")
	}
}

// TestBlobsProxyCrashMidFill kills peerd (kill -9) mid-fill after at least
// one flush: the chunks that flush marked present must survive the restart
// and be served without the origin, and the rest fills again.
func TestBlobsProxyCrashMidFill(t *testing.T) {
	const chunk = 256 << 10
	origin := NewOrigin(t, "")
	data, dg := RandomBlob(t, 16<<20)
	origin.Put(storagePath(dg), data)
	// Throttled so the fill of 64 chunks lasts several flush periods.
	origin.Delay.Store(int64(100 * time.Millisecond))
	n := StartNode(t, NodeOpts{Args: []string{"--upstream-allow", origin.Host, "--chunk-size", "256KiB", "--prefetch", "--prefetch-workers", "2"}})
	u := n.URL("/blobs/" + origin.URL + storagePath(dg))
	Get(t, "GET", u, map[string]string{"Range": "bytes=0-0"})
	// The chunk map on disk is written only by a flush: wait for one.
	var flushed []int
	deadline := time.Now().Add(30 * time.Second)
	for len(flushed) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no chunk flushed within 30s")
		}
		time.Sleep(20 * time.Millisecond)
		flushed = flushedChunks(t, n.DataDir)
	}
	n.Kill()
	flushed = flushedChunks(t, n.DataDir) // a flush may have landed before the kill
	if len(flushed) == len(data)/chunk {
		t.Fatalf("all %d chunks flushed before the kill: not mid-fill", len(flushed))
	}
	// The origin's answers to the killed process, delayed, still count
	// their bytes: let them finish before counting what the restart fetches.
	for prev := int64(-1); origin.Sent.Load() != prev; {
		prev = origin.Sent.Load()
		time.Sleep(300 * time.Millisecond)
	}
	origin.Delay.Store(0)
	origin.Fail.Store(true)
	n.start()
	if got := n.Metric(t, "peerd_cache_size_bytes"); got < float64(len(flushed)*chunk) {
		t.Fatalf("after kill -9: cache holds %v bytes, %d chunks of %d bytes were flushed", got, len(flushed), chunk)
	}
	// The flushed chunks are served from the cache (the origin fails).
	for _, i := range flushed {
		from, to := i*chunk, (i+1)*chunk
		code, _, body := Get(t, "GET", u, map[string]string{"Range": fmt.Sprintf("bytes=%d-%d", from, to-1)})
		if code != 206 || !bytes.Equal(body, data[from:to]) {
			t.Fatalf("flushed chunk %d after kill -9: status %d, bytes equal %v", i, code, bytes.Equal(body, data[from:to]))
		}
	}
	origin.Fail.Store(false)
	sent := origin.Sent.Load()
	if code, _, body := Get(t, "GET", u, nil); code != 200 || !bytes.Equal(body, data) {
		t.Fatalf("after kill -9 mid-fill: status %d, bytes equal %v", code, bytes.Equal(body, data))
	}
	waitMetric(t, n, "peerd_cache_verifications_total", 1, "result=ok")
	if refetched := origin.Sent.Load() - sent; refetched > int64(len(data)-len(flushed)*chunk) {
		t.Fatalf("after the restart the origin sent %d bytes; only %d were not flushed", refetched, len(data)-len(flushed)*chunk)
	}
	t.Logf("%d of %d chunks flushed before kill -9 and kept", len(flushed), len(data)/chunk)
}

// flushedChunks returns the chunks the on-disk chunk map of the one blob in
// peerd's data folder marks present.
func flushedChunks(t *testing.T, dataDir string) []int {
	t.Helper()
	maps, _ := filepath.Glob(filepath.Join(dataDir, "cache", "blobs", "*", "*", "chunks"))
	if len(maps) != 1 {
		return nil
	}
	states, err := os.ReadFile(maps[0])
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for i, s := range states {
		if s != 0 {
			out = append(out, i)
		}
	}
	return out
}

func TestHealthReadyMetrics(t *testing.T) {
	n := StartNode(t, NodeOpts{})
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, _, _ := Get(t, "GET", n.URL(p), nil); code != 200 {
			t.Errorf("%s: %d", p, code)
		}
	}
	code, _, body := Get(t, "GET", n.URL("/metrics/prometheus"), nil)
	if code != 200 || !strings.Contains(string(body), "peerd_cache_size_bytes") {
		t.Fatalf("metrics: %d", code)
	}
	if err := n.Stop(); err != nil {
		t.Fatalf("SIGTERM exit: %v", err)
	}
}

func waitMetric(t *testing.T, n *Node, name string, want float64, labels ...string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := n.Metric(t, name, labels...)
		if got >= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s%v = %v, want >= %v", name, labels, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
