package httpmirror

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/regauth"
	"github.com/peerd-project/peerd/upstream"
	"github.com/prometheus/client_golang/prometheus"
)

// fakeRegistry serves blobs and manifests by digest, optionally behind a
// bearer token and a redirect to "storage" (another path on the same server).
type fakeRegistry struct {
	srv      *httptest.Server
	mu       sync.Mutex
	blobs    map[string][]byte // "<repo>/<kind>/<digest>" -> bytes
	token    string            // required "Bearer <token>" when set
	redirect bool
	fail     int // status to answer instead, when set
	bytes    atomic.Int64
	auths    []string // Authorization headers seen by /v2/ and /storage/
	accepts  []string
	// headDigest: manifests are answered with Docker-Content-Digest, as
	// registries do (a test without it sees the GET fallback).
	headDigest bool
	methods    []string // "<method> <path>" of every manifest request
}

func newFakeRegistry(t *testing.T) *fakeRegistry {
	r := &fakeRegistry{blobs: map[string][]byte{}}
	r.srv = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *fakeRegistry) serve(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	r.auths = append(r.auths, req.Header.Get("Authorization"))
	if strings.Contains(req.URL.Path, "/manifests/") {
		r.accepts = append(r.accepts, req.Header.Get("Accept"))
		r.methods = append(r.methods, req.Method+" "+req.URL.Path)
	}
	token, redirect, fail, headDigest := r.token, r.redirect, r.fail, r.headDigest
	r.mu.Unlock()
	if fail != 0 {
		http.Error(w, "failing", fail)
		return
	}
	path := req.URL.Path
	if p, ok := strings.CutPrefix(path, "/storage/"); ok {
		path = p // the storage redirect target: no token needed
	} else {
		path = strings.TrimPrefix(path, "/v2/")
		if token != "" && req.Header.Get("Authorization") != "Bearer "+token {
			w.Header().Set("Www-Authenticate", `Bearer realm="https://auth.example/token",service="reg",scope="repository:x:pull"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
			return
		}
		if redirect && strings.Contains(path, "/blobs/") {
			http.Redirect(w, req, "/storage/"+path, http.StatusTemporaryRedirect)
			return
		}
	}
	r.mu.Lock()
	b, ok := r.blobs[path]
	r.mu.Unlock()
	if !ok {
		http.Error(w, "unknown", http.StatusNotFound)
		return
	}
	if headDigest && strings.Contains(path, "/manifests/") {
		sum := sha256.Sum256(b)
		w.Header().Set("Docker-Content-Digest", "sha256:"+hex.EncodeToString(sum[:]))
	}
	cw := &countWriter{ResponseWriter: w, n: &r.bytes}
	http.ServeContent(cw, req, "", time.Time{}, bytes.NewReader(b))
}

type countWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	c.n.Add(int64(len(p)))
	return c.ResponseWriter.Write(p)
}

type ptFixture struct {
	reg   *fakeRegistry
	cache *cache.Cache
	srv   *httptest.Server
	peer  *peerSource
}

func newPTFixture(t *testing.T) *ptFixture { t.Helper(); return newPTFixtureWith(t, nil) }

// newPTFixtureWith is newPTFixture with the handler's config adjusted.
func newPTFixtureWith(t *testing.T, adjust func(*OCIConfig)) *ptFixture {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	c, err := cache.Open(cache.Options{Dir: t.TempDir(), ChunkSize: 64 << 10, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fx := &ptFixture{reg: newFakeRegistry(t), cache: c, peer: &peerSource{blobs: map[blob.Key][]byte{}}}
	cfg := OCIConfig{
		Cache:       c,
		Plan:        func(k blob.Key, o blob.Source) cache.Plan { return cache.Plan{Peers: fx.peer, Origin: o} },
		Registries:  []string{"registry.example", "other.example"},
		PullThrough: map[string]string{"registry.example": fx.reg.srv.URL},
		Upstream:    upstream.NewClient(upstream.Options{Logger: log}),
		Logger:      log,
		Registry:    prometheus.NewRegistry(),
	}
	if adjust != nil {
		adjust(&cfg)
	}
	h := NewOCI(cfg)
	fx.srv = httptest.NewServer(New(Config{Cache: c, OCI: h, Logger: log}))
	t.Cleanup(fx.srv.Close)
	return fx
}

func (fx *ptFixture) get(t *testing.T, path string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, fx.srv.URL+path, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, body
}

func randBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestPullThroughBlobStreamsCachesAndFollowsRedirects(t *testing.T) {
	fx := newPTFixture(t)
	data := randBytes(t, 300<<10+17) // several chunks and a short last one
	k := keyOf(data)
	fx.reg.blobs["lib/app/blobs/"+string(k)] = data
	fx.reg.redirect = true

	resp, body := fx.get(t, "/v2/lib/app/blobs/"+string(k)+"?ns=registry.example")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
		t.Fatalf("status %d, %d bytes (want %d)", resp.StatusCode, len(body), len(data))
	}
	if got := resp.Header.Get("Docker-Content-Digest"); got != string(k) {
		t.Fatalf("digest header %q", got)
	}
	sent := fx.reg.bytes.Load()
	if sent != int64(len(data)) {
		t.Fatalf("registry sent %d bytes for a %d-byte blob", sent, len(data))
	}
	// Cached: a second read costs the registry nothing, and the blob verified.
	resp, body = fx.get(t, "/v2/lib/app/blobs/"+string(k)+"?ns=registry.example")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) || fx.reg.bytes.Load() != sent {
		t.Fatalf("second read: status %d, registry sent %d more bytes", resp.StatusCode, fx.reg.bytes.Load()-sent)
	}
	// Verification runs just after the last chunk landed.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		info, ok := fx.cache.Stat(k)
		if ok && info.Verified {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cache: %+v, want verified", info)
		}
	}
}

func TestPullThroughPrefersPeers(t *testing.T) {
	fx := newPTFixture(t)
	data := randBytes(t, 100<<10)
	k := keyOf(data)
	fx.reg.blobs["lib/app/blobs/"+string(k)] = data
	fx.peer.blobs[k] = data
	resp, body := fx.get(t, "/v2/lib/app/blobs/"+string(k)+"?ns=registry.example")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if n := fx.reg.bytes.Load(); n != 0 {
		t.Fatalf("registry sent %d bytes though a peer had the blob", n)
	}
}

func TestPullThroughRelaysChallengeAndForwardsToken(t *testing.T) {
	fx := newPTFixture(t)
	data := randBytes(t, 70<<10)
	k := keyOf(data)
	fx.reg.blobs["lib/app/blobs/"+string(k)] = data
	fx.reg.token = "s3cret"
	fx.reg.redirect = true
	path := "/v2/lib/app/blobs/" + string(k) + "?ns=registry.example"

	resp, body := fx.get(t, path)
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("without a token: status %d (%s), want 401", resp.StatusCode, body)
	}
	if c := resp.Header.Get("Www-Authenticate"); !strings.Contains(c, `realm="https://auth.example/token"`) {
		t.Fatalf("challenge %q not relayed", c)
	}
	resp, body = fx.get(t, path, "Authorization", "Bearer s3cret")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
		t.Fatalf("with the token: status %d (%s)", resp.StatusCode, body)
	}
	fx.reg.mu.Lock()
	defer fx.reg.mu.Unlock()
	sawToken := false
	for _, a := range fx.reg.auths {
		if a == "Bearer s3cret" {
			sawToken = true
		}
	}
	if !sawToken {
		t.Fatal("the registry never saw containerd's token")
	}
}

func TestPullThroughOnlyListedRegistriesAndFallbacks(t *testing.T) {
	fx := newPTFixture(t)
	data := randBytes(t, 10<<10)
	k := keyOf(data)
	fx.reg.blobs["lib/app/blobs/"+string(k)] = data
	// other.example is in --registries but has no pull-through server; an
	// unlisted registry is never contacted.
	for _, ns := range []string{"other.example", "evil.example", ""} {
		resp, body := fx.get(t, "/v2/lib/app/blobs/"+string(k)+"?ns="+ns)
		if resp.StatusCode != http.StatusNotFound {
			t.Fatalf("ns=%q: status %d (%s), want 404", ns, resp.StatusCode, body)
		}
	}
	if n := fx.reg.bytes.Load(); n != 0 {
		t.Fatalf("registry contacted for an unlisted registry (%d bytes)", n)
	}
	// A failing registry gives a 404, so containerd falls back to it itself.
	fx.reg.fail = http.StatusForbidden
	resp, body := fx.get(t, "/v2/lib/app/blobs/"+string(k)+"?ns=registry.example")
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("failing registry: status %d (%s), want 404", resp.StatusCode, body)
	}
	// A blob the registry does not have: 404.
	fx.reg.fail = 0
	other := randBytes(t, 100)
	resp, _ = fx.get(t, "/v2/lib/app/blobs/"+string(keyOf(other))+"?ns=registry.example")
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("unknown blob: status %d, want 404", resp.StatusCode)
	}
}

func TestPullThroughManifestByDigest(t *testing.T) {
	fx := newPTFixture(t)
	m := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`)
	k := keyOf(m)
	fx.reg.blobs["lib/app/manifests/"+string(k)] = m
	resp, body := fx.get(t, "/v2/lib/app/manifests/"+string(k)+"?ns=registry.example")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, m) {
		t.Fatalf("status %d (%s)", resp.StatusCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/vnd.oci.image.manifest.v1+json" {
		t.Fatalf("content type %q", ct)
	}
	fx.reg.mu.Lock()
	defer fx.reg.mu.Unlock()
	if len(fx.reg.accepts) == 0 || !strings.Contains(fx.reg.accepts[0], "application/vnd.oci.image.index.v1+json") {
		t.Fatalf("registry got Accept %q", fx.reg.accepts)
	}
}

// An unlisted registry is never contacted, even when ?ns= names a real,
// reachable server, while a listed one serves the same blob.
func TestPullThroughNeverContactsUnlistedRegistry(t *testing.T) {
	fx := newPTFixture(t)
	data := randBytes(t, 10<<10)
	k := keyOf(data)
	fx.reg.blobs["lib/app/blobs/"+string(k)] = data
	unlisted := newFakeRegistry(t) // holds the blob too, and counts every request
	unlisted.blobs["lib/app/blobs/"+string(k)] = data
	unlistedHost := strings.TrimPrefix(unlisted.srv.URL, "http://")
	for _, ns := range []string{unlistedHost, "localhost:" + unlistedHost[strings.LastIndexByte(unlistedHost, ':')+1:], unlisted.srv.URL} {
		resp, body := fx.get(t, "/v2/lib/app/blobs/"+string(k)+"?ns="+ns)
		if resp.StatusCode != http.StatusNotFound {
			t.Fatalf("ns=%q: status %d (%s), want 404", ns, resp.StatusCode, body)
		}
	}
	resp, body := fx.get(t, "/v2/lib/app/blobs/"+string(k)+"?ns=registry.example")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
		t.Fatalf("listed registry: status %d", resp.StatusCode)
	}
	unlisted.mu.Lock()
	defer unlisted.mu.Unlock()
	if n := len(unlisted.auths); n != 0 {
		t.Fatalf("the unlisted registry got %d requests", n)
	}
}

// A manifest that came from peers names blobs peers likely hold: the mirror
// tells ExpectPeers its config and layers (an index: its manifests). One from
// the registry tells nothing.
func TestManifestFromPeersExpectsItsBlobsThere(t *testing.T) {
	var mu sync.Mutex
	var told [][]blob.Key
	fx := newPTFixtureWith(t, func(c *OCIConfig) {
		c.ExpectPeers = func(ks []blob.Key) { mu.Lock(); told = append(told, ks); mu.Unlock() }
	})
	layer, config := keyOf([]byte("layer")), keyOf([]byte("config"))
	m := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"` + string(config) +
		`"},"layers":[{"digest":"` + string(layer) + `"},{"digest":"sha256:bad"}]}`)
	idx := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"digest":"` + string(keyOf(m)) + `"}]}`)
	fromReg := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"` + string(layer) + `"},"layers":[]}`)
	fx.peer.blobs[keyOf(m)] = m
	fx.peer.blobs[keyOf(idx)] = idx
	fx.reg.blobs["lib/app/manifests/"+string(keyOf(fromReg))] = fromReg

	for _, b := range [][]byte{m, idx, fromReg} {
		resp, body := fx.get(t, "/v2/lib/app/manifests/"+string(keyOf(b))+"?ns=registry.example")
		if resp.StatusCode != http.StatusOK || !bytes.Equal(body, b) {
			t.Fatalf("status %d (%s)", resp.StatusCode, body)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	want := [][]blob.Key{{layer, config}, {keyOf(m)}}
	if fmt.Sprint(told) != fmt.Sprint(want) {
		t.Fatalf("ExpectPeers told %v, want %v (nothing for the registry's manifest)", told, want)
	}
}

// With --registry-auth-file, a pull-through whose client sent no
// Authorization answers the registry's challenge with the node's own
// credentials; a client's own Authorization still goes as it is.
func TestPullThroughUsesTheNodeCredentialsWhenTheClientHasNone(t *testing.T) {
	fx := newPTFixtureWith(t, func(c *OCIConfig) {
		host := strings.TrimPrefix(c.PullThrough["registry.example"], "http://")
		kc, err := regauth.Parse([]byte(`{"auths":{"`+host+`":{"registrytoken":"node-token"}}}`), c.Upstream.HTTPClient())
		if err != nil {
			t.Fatal(err)
		}
		c.Auth = kc
	})
	data := randBytes(t, 100<<10)
	k := keyOf(data)
	fx.reg.blobs["lib/app/blobs/"+string(k)] = data
	fx.reg.token = "node-token"
	resp, body := fx.get(t, "/v2/lib/app/blobs/"+string(k)+"?ns=registry.example")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
		t.Fatalf("status %d, %d bytes", resp.StatusCode, len(body))
	}
	fx.reg.mu.Lock()
	auths := slices.Clone(fx.reg.auths)
	fx.reg.mu.Unlock()
	if !slices.Contains(auths, "Bearer node-token") {
		t.Fatalf("the registry saw %q, never the node's token", auths)
	}
}
