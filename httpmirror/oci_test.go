package httpmirror

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/prometheus/client_golang/prometheus"
)

func keyOf(b []byte) blob.Key {
	s := sha256.Sum256(b)
	return blob.Key("sha256:" + hex.EncodeToString(s[:]))
}

type memBlob struct {
	*bytes.Reader
	mt string
}

func (m memBlob) Close() error      { return nil }
func (m memBlob) MediaType() string { return m.mt }

// fakeStore stands in for containerd's store.
type fakeStore struct {
	blobs map[blob.Key][]byte
	types map[blob.Key]string
	tags  map[string]blob.Key
}

func (f *fakeStore) OpenBlob(ctx context.Context, k blob.Key) (OCIBlob, error) {
	b, ok := f.blobs[k]
	if !ok {
		return nil, fmt.Errorf("%s: %w", k, blob.ErrNotFound)
	}
	return memBlob{bytes.NewReader(b), f.types[k]}, nil
}

func (f *fakeStore) Resolve(ctx context.Context, name string) (blob.Key, error) {
	k, ok := f.tags[name]
	if !ok {
		return "", fmt.Errorf("%s: %w", name, blob.ErrNotFound)
	}
	return k, nil
}

// peerSource is a fake peer holding some blobs.
type peerSource struct {
	blobs map[blob.Key][]byte
	calls atomic.Int64
}

func (p *peerSource) Name() string { return "peer" }

func (p *peerSource) Fetch(ctx context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	p.calls.Add(1)
	b, ok := p.blobs[k]
	if !ok {
		return nil, -1, fmt.Errorf("%s: %w", k, blob.ErrNotFound)
	}
	end := min(off+n, int64(len(b)))
	return io.NopCloser(bytes.NewReader(b[off:end])), int64(len(b)), nil
}

type ociFixture struct {
	srv   *httptest.Server
	store *fakeStore
	peer  *peerSource
	cache *cache.Cache
}

const (
	ociManifestType = "application/vnd.oci.image.manifest.v1+json"
	dockerListType  = "application/vnd.docker.distribution.manifest.list.v2+json"
)

func newOCIFixture(t *testing.T) *ociFixture {
	t.Helper()
	c, err := cache.Open(cache.Options{Dir: t.TempDir(), ChunkSize: 64 << 10, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fx := &ociFixture{
		store: &fakeStore{blobs: map[blob.Key][]byte{}, types: map[blob.Key]string{}, tags: map[string]blob.Key{}},
		peer:  &peerSource{blobs: map[blob.Key][]byte{}},
		cache: c,
	}
	h := NewOCI(OCIConfig{
		Local:      fx.store,
		Cache:      c,
		Plan:       func(k blob.Key, o blob.Source) cache.Plan { return cache.Plan{Peers: fx.peer, Origin: o} },
		Registries: []string{"registry.example", "docker.io"},
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		Registry:   prometheus.NewRegistry(),
	})
	fx.srv = httptest.NewServer(New(Config{Cache: c, OCI: h, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}))
	t.Cleanup(fx.srv.Close)
	return fx
}

func (fx *ociFixture) do(t *testing.T, method, path string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, fx.srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, body
}

// wantOCIError checks status and the OCI error body.
func wantOCIError(t *testing.T, resp *http.Response, body []byte, status int, code string) {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("%s: status %d, want %d (%s)", resp.Request.URL.Path, resp.StatusCode, status, body)
	}
	var e struct {
		Errors []struct{ Code, Message string }
	}
	if err := json.Unmarshal(body, &e); err != nil || len(e.Errors) != 1 || e.Errors[0].Code != code {
		t.Fatalf("%s: body %q, want OCI error %s", resp.Request.URL.Path, body, code)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("error content type %q", ct)
	}
}

func TestOCIBadRequests(t *testing.T) {
	fx := newOCIFixture(t)
	d := keyOf([]byte("x"))
	for _, c := range []struct {
		method, path string
		status       int
		code         string
	}{
		{"PUT", "/v2/team/app/manifests/v1", 405, "UNSUPPORTED"},
		{"POST", "/v2/team/app/blobs/uploads/", 405, "UNSUPPORTED"},
		{"DELETE", "/v2/team/app/blobs/" + string(d), 405, "UNSUPPORTED"},
		{"GET", "/v2/Team/App/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/team//app/blobs/" + string(d), 400, "NAME_INVALID"},
		{"GET", "/v2/team/app-/blobs/" + string(d), 400, "NAME_INVALID"},
		{"GET", "/v2/team/app/blobs/sha256:abc", 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/blobs/md5:" + d.Hex()[:32], 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/blobs/latest", 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/manifests/-bad", 400, "TAG_INVALID"},
		{"GET", "/v2/team/app/manifests/" + strings.Repeat("t", 129), 400, "TAG_INVALID"},
		{"GET", "/v2/team/app/tags/list", 400, "UNSUPPORTED"},
		{"GET", "/v2/team%2Fapp/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/app", 400, "NAME_UNKNOWN"},
	} {
		resp, body := fx.do(t, c.method, c.path)
		wantOCIError(t, resp, body, c.status, c.code)
		if c.status == 405 && resp.Header.Get("Allow") != "GET, HEAD" {
			t.Errorf("%s %s: Allow %q", c.method, c.path, resp.Header.Get("Allow"))
		}
	}
	resp, body := fx.do(t, "GET", "/v2/")
	if resp.StatusCode != 200 || string(body) != "{}" {
		t.Fatalf("/v2/: %d %q", resp.StatusCode, body)
	}
}

func TestOCIBlobFromContainerd(t *testing.T) {
	fx := newOCIFixture(t)
	layer := bytes.Repeat([]byte("containerd layer "), 200_000)
	k := keyOf(layer)
	fx.store.blobs[k] = layer
	fx.store.types[k] = "application/vnd.oci.image.layer.v1.tar+gzip"
	path := "/v2/team/app/blobs/" + string(k) + "?ns=registry.example"

	resp, body := fx.do(t, "GET", path)
	if resp.StatusCode != 200 || !bytes.Equal(body, layer) {
		t.Fatalf("GET: %d, %d bytes", resp.StatusCode, len(body))
	}
	for h, want := range map[string]string{
		"Content-Type":          "application/vnd.oci.image.layer.v1.tar+gzip",
		"Docker-Content-Digest": string(k),
		"Content-Length":        fmt.Sprint(len(layer)),
	} {
		if got := resp.Header.Get(h); got != want {
			t.Errorf("%s = %q, want %q", h, got, want)
		}
	}
	resp, body = fx.do(t, "GET", path, "Range", "bytes=100-199")
	if resp.StatusCode != 206 || !bytes.Equal(body, layer[100:200]) || resp.Header.Get("Content-Range") != fmt.Sprintf("bytes 100-199/%d", len(layer)) {
		t.Fatalf("range: %d %q %q", resp.StatusCode, resp.Header.Get("Content-Range"), body)
	}
	resp, body = fx.do(t, "HEAD", path)
	if resp.StatusCode != 200 || len(body) != 0 || resp.Header.Get("Content-Length") != fmt.Sprint(len(layer)) {
		t.Fatalf("HEAD: %d, len %s, body %d", resp.StatusCode, resp.Header.Get("Content-Length"), len(body))
	}
	resp, _ = fx.do(t, "GET", path, "Range", fmt.Sprintf("bytes=%d-", len(layer)))
	if resp.StatusCode != 416 {
		t.Fatalf("unsatisfiable range: %d", resp.StatusCode)
	}
	if n := fx.peer.calls.Load(); n != 0 {
		t.Fatalf("asked peers %d times for a blob containerd holds", n)
	}
}

// An empty blob containerd holds is served as one: 200, no bytes.
func TestOCIEmptyBlobFromContainerd(t *testing.T) {
	fx := newOCIFixture(t)
	k := keyOf(nil)
	fx.store.blobs[k] = []byte{}
	resp, body := fx.do(t, "GET", "/v2/team/app/blobs/"+string(k)+"?ns=registry.example")
	if resp.StatusCode != 200 || len(body) != 0 || resp.Header.Get("Content-Length") != "0" {
		t.Fatalf("GET of an empty blob: %d, %d bytes, Content-Length %q", resp.StatusCode, len(body), resp.Header.Get("Content-Length"))
	}
}

func TestOCIBlobFromPeersAndLocalOnly(t *testing.T) {
	fx := newOCIFixture(t)
	layer := bytes.Repeat([]byte("peer layer "), 50_000)
	k := keyOf(layer)
	fx.peer.blobs[k] = layer
	path := "/v2/team/app/blobs/" + string(k) + "?ns=registry.example"

	// A peer's request is answered from local content only: nothing yet.
	resp, body := fx.do(t, "GET", path, LocalOnlyHeader, "1")
	wantOCIError(t, resp, body, 404, "BLOB_UNKNOWN")
	if n := fx.peer.calls.Load(); n != 0 {
		t.Fatalf("a local-only request reached peers (%d fetches)", n)
	}

	resp, body = fx.do(t, "GET", path)
	if resp.StatusCode != 200 || !bytes.Equal(body, layer) || resp.Header.Get("Docker-Content-Digest") != string(k) {
		t.Fatalf("from peers: %d, %d bytes", resp.StatusCode, len(body))
	}
	if fx.peer.calls.Load() == 0 {
		t.Fatal("peers not asked")
	}
	// Now the cache holds it, verified just after the last chunk landed: a
	// peer may have it.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if info, ok := fx.cache.Stat(k); ok && info.Verified {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the blob read from peers never verified")
		}
	}
	calls := fx.peer.calls.Load()
	resp, body = fx.do(t, "GET", path, LocalOnlyHeader, "1", "Range", "bytes=10-19")
	if resp.StatusCode != 206 || !bytes.Equal(body, layer[10:20]) {
		t.Fatalf("local-only from cache: %d %q", resp.StatusCode, body)
	}
	if fx.peer.calls.Load() != calls {
		t.Fatal("local-only request fetched")
	}

	// Nobody has it: 404 so containerd moves on.
	resp, body = fx.do(t, "GET", "/v2/team/app/blobs/"+string(keyOf([]byte("nobody")))+"?ns=registry.example")
	wantOCIError(t, resp, body, 404, "BLOB_UNKNOWN")
	resp, _ = fx.do(t, "HEAD", "/v2/team/app/blobs/"+string(keyOf([]byte("nobody"))))
	if resp.StatusCode != 404 {
		t.Fatalf("HEAD unknown: %d", resp.StatusCode)
	}
}

func TestOCIManifests(t *testing.T) {
	fx := newOCIFixture(t)
	manifest := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifestType + `","config":{},"layers":[]}`)
	mk := keyOf(manifest)
	fx.store.blobs[mk] = manifest
	fx.store.types[mk] = ociManifestType
	fx.store.tags["registry.example/team/app:v1"] = mk
	fx.store.tags["other.example/team/app:v1"] = mk
	// An index without mediaType, known to the store without a type.
	index := []byte(`{"schemaVersion":2,"manifests":[]}`)
	ik := keyOf(index)
	fx.store.blobs[ik] = index
	// A Docker list held only by a peer.
	list := []byte(`{"schemaVersion":2,"mediaType":"` + dockerListType + `","manifests":[]}`)
	lk := keyOf(list)
	fx.peer.blobs[lk] = list
	// A layer asked for as a manifest.
	layer := []byte("not json")
	fx.store.blobs[keyOf(layer)] = layer
	// A peer that lies about a digest.
	forged := keyOf([]byte(`{"schemaVersion":2,"layers":[]}`))
	fx.peer.blobs[forged] = []byte(`{"schemaVersion":2,"layers":[1]}`)

	for _, c := range []struct {
		method, path, ct string
		body             []byte
		digest           blob.Key
	}{
		{"GET", "/v2/team/app/manifests/" + string(mk) + "?ns=registry.example", ociManifestType, manifest, mk},
		{"HEAD", "/v2/team/app/manifests/" + string(mk) + "?ns=registry.example", ociManifestType, nil, mk},
		{"GET", "/v2/team/app/manifests/v1?ns=registry.example", ociManifestType, manifest, mk},
		{"HEAD", "/v2/team/app/manifests/v1?ns=registry.example", ociManifestType, nil, mk},
		{"GET", "/v2/team/app/manifests/" + string(ik), "application/vnd.oci.image.index.v1+json", index, ik},
		{"GET", "/v2/team/app/manifests/" + string(lk) + "?ns=registry.example", dockerListType, list, lk},
	} {
		resp, body := fx.do(t, c.method, c.path)
		if resp.StatusCode != 200 || !bytes.Equal(body, c.body) {
			t.Fatalf("%s %s: %d %q", c.method, c.path, resp.StatusCode, body)
		}
		if resp.Header.Get("Content-Type") != c.ct || resp.Header.Get("Docker-Content-Digest") != string(c.digest) {
			t.Errorf("%s %s: type %q digest %q", c.method, c.path, resp.Header.Get("Content-Type"), resp.Header.Get("Docker-Content-Digest"))
		}
		want := len(c.body)
		if c.method == "HEAD" {
			want = len(manifest)
		}
		if resp.Header.Get("Content-Length") != fmt.Sprint(want) {
			t.Errorf("%s %s: length %q want %d", c.method, c.path, resp.Header.Get("Content-Length"), want)
		}
	}
	for _, path := range []string{
		"/v2/team/app/manifests/v1?ns=other.example", // registry not in the list
		"/v2/team/app/manifests/v1",                  // registry unknown
		"/v2/team/app/manifests/v2?ns=registry.example",
		"/v2/team/app/manifests/" + string(keyOf(layer)),
		"/v2/team/app/manifests/" + string(forged),
		"/v2/team/app/manifests/" + string(keyOf([]byte("nobody"))),
	} {
		resp, body := fx.do(t, "GET", path)
		wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
	}
	// Peers never answer a local-only manifest request.
	calls := fx.peer.calls.Load()
	fx.peer.blobs[keyOf([]byte(`{"schemaVersion":2,"manifests":[1]}`))] = []byte(`{"schemaVersion":2,"manifests":[1]}`)
	resp, body := fx.do(t, "GET", "/v2/team/app/manifests/"+string(keyOf([]byte(`{"schemaVersion":2,"manifests":[1]}`))), LocalOnlyHeader, "1")
	wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
	if fx.peer.calls.Load() != calls {
		t.Fatal("local-only manifest request reached peers")
	}
}
