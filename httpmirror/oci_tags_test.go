package httpmirror

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/prometheus/client_golang/prometheus"
)

// tagAsk records the mirror's calls to the --resolve-tags hook.
type tagAsk struct {
	mu    sync.Mutex
	calls []string
	to    map[string]blob.Key
}

func (a *tagAsk) resolve(ctx context.Context, registry, repo, tag string) (blob.Key, error) {
	name := registry + "/" + repo + ":" + tag
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls = append(a.calls, name)
	if k, ok := a.to[name]; ok {
		return k, nil
	}
	return "", fmt.Errorf("no peer holds %s: %w", name, blob.ErrNotFound)
}

func (a *tagAsk) n() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.calls)
}

// newTagFixture is newOCIFixture with or without peer tag resolution.
func newTagFixture(t *testing.T, ask *tagAsk) *ociFixture {
	t.Helper()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	c, err := cache.Open(cache.Options{Dir: t.TempDir(), ChunkSize: 64 << 10, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fx := &ociFixture{
		store: &fakeStore{blobs: map[blob.Key][]byte{}, types: map[blob.Key]string{}, tags: map[string]blob.Key{}},
		peer:  &peerSource{blobs: map[blob.Key][]byte{}},
		cache: c,
	}
	cfg := OCIConfig{
		Local:      fx.store,
		Cache:      c,
		Plan:       func(k blob.Key, o blob.Source) cache.Plan { return cache.Plan{Peers: fx.peer, Origin: o} },
		Registries: []string{"registry.example"},
		Logger:     quiet,
		Registry:   prometheus.NewRegistry(),
	}
	if ask != nil {
		cfg.ResolveTag = ask.resolve
	}
	fx.srv = httptest.NewServer(New(Config{Cache: c, OCI: NewOCI(cfg), Logger: quiet}))
	t.Cleanup(fx.srv.Close)
	return fx
}

func TestOCITagsFromPeers(t *testing.T) {
	manifest := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifestType + `","config":{},"layers":[]}`)
	mk := keyOf(manifest)
	local := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifestType + `","config":{},"layers":[{}]}`)
	lk := keyOf(local)
	honest := keyOf([]byte(`{"schemaVersion":2,"layers":[]}`))

	t.Run("flag off: local image store only", func(t *testing.T) {
		fx := newTagFixture(t, nil)
		fx.peer.blobs[mk] = manifest // a peer holds the manifest, but the tag is unknown here
		resp, body := fx.do(t, "GET", "/v2/team/app/manifests/v1?ns=registry.example")
		wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
		if fx.peer.calls.Load() != 0 {
			t.Fatal("a tag miss without --resolve-tags reached peers")
		}
	})

	ask := &tagAsk{to: map[string]blob.Key{
		"registry.example/team/app:v1":     mk,
		"registry.example/team/app:forged": honest,
		"other.example/team/app:v1":        mk,
	}}
	fx := newTagFixture(t, ask)
	fx.peer.blobs[mk] = manifest
	fx.peer.blobs[honest] = []byte(`{"schemaVersion":2,"layers":[1]}`) // bytes that do not match the digest
	fx.store.blobs[lk] = local
	fx.store.tags["registry.example/team/app:local"] = lk

	// A tag the local store lacks resolves through peers; the manifest is
	// then served by digest, from peers.
	for _, method := range []string{"HEAD", "GET"} {
		resp, body := fx.do(t, method, "/v2/team/app/manifests/v1?ns=registry.example")
		if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != string(mk) || resp.Header.Get("Content-Type") != ociManifestType {
			t.Fatalf("%s tag through peers: %d %v", method, resp.StatusCode, resp.Header)
		}
		if method == "GET" && !bytes.Equal(body, manifest) {
			t.Fatalf("body %q", body)
		}
	}
	if ask.n() != 2 {
		t.Fatalf("peers asked %d times, want 2", ask.n())
	}

	// A tag the local store holds never goes to peers.
	resp, _ := fx.do(t, "GET", "/v2/team/app/manifests/local?ns=registry.example")
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != string(lk) || ask.n() != 2 {
		t.Fatalf("local tag: %d %s, peers asked %d times", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"), ask.n())
	}

	// Refused before any peer is asked: unlisted registry, no registry,
	// a peer's (local-only) request.
	for _, c := range []struct{ path, hdr string }{
		{"/v2/team/app/manifests/v1?ns=other.example", ""},
		{"/v2/team/app/manifests/v1", ""},
		{"/v2/team/app/manifests/v1?ns=registry.example", LocalOnlyHeader},
	} {
		var hdr []string
		if c.hdr != "" {
			hdr = []string{c.hdr, "1"}
		}
		resp, body := fx.do(t, "GET", c.path, hdr...)
		wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
	}
	if ask.n() != 2 {
		t.Fatalf("peers asked %d times after refusals, want 2 (calls %v)", ask.n(), ask.calls)
	}

	// A peer's answer is only a digest: bytes that do not match it are not served.
	resp, body := fx.do(t, "GET", "/v2/team/app/manifests/forged?ns=registry.example")
	wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
	// Nobody holds it.
	resp, body = fx.do(t, "GET", "/v2/team/app/manifests/v9?ns=registry.example")
	wantOCIError(t, resp, body, 404, "MANIFEST_UNKNOWN")
}
