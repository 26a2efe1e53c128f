// Package artifacttest pushes OCI artifacts the way ORAS does (files as
// layers named by their title annotation) to a registry on loopback, for
// the tests of the mount's oci tree.
package artifacttest

import (
	"crypto/rand"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// TitleAnnotation names a layer's file.
const TitleAnnotation = "org.opencontainers.image.title"

// Registry is an in-memory OCI registry on loopback.
type Registry struct {
	URL  string // http://127.0.0.1:port
	Host string // 127.0.0.1:port
	// Deny, when it returns true for a request, answers 401 with a challenge.
	Deny atomic.Pointer[func(*http.Request) bool]
	// TagRequests counts manifest requests by tag; TokenRequests the
	// token endpoint's answers.
	TagRequests   atomic.Int64
	TokenRequests atomic.Int64

	auth   atomic.Pointer[Auth]
	mu     sync.Mutex
	issued map[string]bool
}

// Auth guards the repositories under Prefix: with Basic, HTTP Basic
// User:Pass; else Bearer tokens from the registry's own /token endpoint,
// which wants Basic User:Pass (the way Docker Hub and GHCR do it).
type Auth struct {
	Prefix, User, Pass string
	Basic              bool
}

// SetAuth guards repositories from now on (nil: none).
func (r *Registry) SetAuth(a *Auth) { r.auth.Store(a) }

// guard answers for a guarded repository: true when it wrote a 401.
func (r *Registry) guard(w http.ResponseWriter, req *http.Request) bool {
	a := r.auth.Load()
	if req.URL.Path == "/token" {
		r.TokenRequests.Add(1)
		if u, p, ok := req.BasicAuth(); a == nil || !ok || u != a.User || p != a.Pass {
			http.Error(w, "bad credentials", http.StatusUnauthorized)
			return true
		}
		r.mu.Lock()
		tok := fmt.Sprintf("tok-%d", len(r.issued)+1)
		r.issued[tok] = true
		r.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"token":%q,"expires_in":300}`, tok)
		return true
	}
	if a == nil || !strings.HasPrefix(req.URL.Path, "/v2/"+a.Prefix) {
		return false
	}
	got := req.Header.Get("Authorization")
	if a.Basic {
		if u, p, ok := req.BasicAuth(); ok && u == a.User && p == a.Pass {
			return false
		}
		w.Header().Set("WWW-Authenticate", `Basic realm="peerd-test"`)
	} else {
		r.mu.Lock()
		ok := strings.HasPrefix(got, "Bearer ") && r.issued[strings.TrimPrefix(got, "Bearer ")]
		r.mu.Unlock()
		if ok {
			return false
		}
		repo := strings.TrimPrefix(req.URL.Path, "/v2/")
		for _, k := range []string{"/manifests/", "/blobs/"} {
			if i := strings.Index(repo, k); i > 0 {
				repo = repo[:i]
			}
		}
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="peerd-test",scope="repository:%s:pull"`, r.URL, repo))
	}
	http.Error(w, "credentials needed", http.StatusUnauthorized)
	return true
}

// NewRegistry starts a registry for the test's duration.
func NewRegistry(t testing.TB) *Registry {
	t.Helper()
	r := &Registry{issued: map[string]bool{}}
	h := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if r.guard(w, req) {
			return
		}
		if d := r.Deny.Load(); d != nil && (*d)(req) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="http://127.0.0.1/token"`)
			http.Error(w, "credentials needed", http.StatusUnauthorized)
			return
		}
		if strings.Contains(req.URL.Path, "/manifests/") && !strings.Contains(req.URL.Path, "/manifests/sha256:") {
			r.TagRequests.Add(1)
		}
		// This registry refuses a range that runs past a blob's end (416),
		// where distribution's registries answer what there is; the origin
		// client reads a whole answer too.
		req.Header.Del("Range")
		h.ServeHTTP(w, req)
	}))
	t.Cleanup(srv.Close)
	r.URL = srv.URL
	r.Host = strings.TrimPrefix(srv.URL, "http://")
	return r
}

// File is one file of an artifact; an empty Title pushes it without one.
type File struct {
	Title string
	Data  []byte
}

// Random returns n random bytes.
func Random(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// Artifact builds an OCI artifact of files.
func Artifact(t testing.TB, files ...File) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, "application/vnd.peerd.test.config.v1+json")
	for _, f := range files {
		add := mutate.Addendum{Layer: static.NewLayer(f.Data, "application/vnd.peerd.test.file")}
		if f.Title != "" {
			add.Annotations = map[string]string{TitleAnnotation: f.Title}
		}
		var err error
		if img, err = mutate.Append(img, add); err != nil {
			t.Fatal(err)
		}
	}
	return img
}

// Push writes img to host/ref (plain HTTP) and returns its manifest digest.
func Push(t testing.TB, host, ref string, img v1.Image) string {
	t.Helper()
	r, err := name.ParseReference(host+"/"+ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// ForPlatform is one entry of an index.
type ForPlatform struct {
	Platform v1.Platform
	Image    v1.Image
}

// PushIndex writes an index of images, one per platform, to host/ref.
func PushIndex(t testing.TB, host, ref string, entries ...ForPlatform) {
	t.Helper()
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, e := range entries {
		p := e.Platform
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: e.Image, Descriptor: v1.Descriptor{Platform: &p}})
	}
	r, err := name.ParseReference(host+"/"+ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(r, idx); err != nil {
		t.Fatal(err)
	}
}
