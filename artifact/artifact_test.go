package artifact

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/peerd-project/peerd/artifact/artifacttest"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/regauth"
	"github.com/peerd-project/peerd/upstream"
)

type layerSpec = artifacttest.File

func file(title string, data []byte) layerSpec { return layerSpec{Title: title, Data: data} }

func randomBytes(n int) []byte { return artifacttest.Random(n) }

type testRegistry struct{ *artifacttest.Registry }

func newRegistry(t *testing.T) testRegistry { return testRegistry{artifacttest.NewRegistry(t)} }

func (r testRegistry) pushArtifact(t *testing.T, ref string, layers ...layerSpec) v1.Image {
	t.Helper()
	img := artifacttest.Artifact(t, layers...)
	artifacttest.Push(t, r.Host, ref, img)
	return img
}

func newResolver(t *testing.T, regs ...testRegistry) (*Resolver, *cache.Cache) {
	t.Helper()
	c, err := cache.Open(cache.Options{Dir: t.TempDir(), ChunkSize: 64 << 10, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	m := map[string]string{}
	for _, r := range regs {
		m[r.Host] = r.URL
	}
	up := upstream.NewClient(upstream.Options{Logger: slog.New(slog.DiscardHandler)})
	return New(Options{Registries: m, Upstream: up, Cache: c, Logger: slog.New(slog.DiscardHandler)}), c
}

func readFile(t *testing.T, c *cache.Cache, f File) []byte {
	t.Helper()
	h := c.Open(f.Key, cache.Plan{Origin: f.Origin})
	defer h.Close()
	b := make([]byte, f.Size)
	if n, err := h.ReadAt(context.Background(), b, 0); int64(n) != f.Size || (err != nil && err != io.EOF) {
		t.Fatalf("%s: read %d of %d bytes: %v", f.Name, n, f.Size, err)
	}
	return b
}

func names(t Tree) []string {
	var out []string
	for _, f := range t.Files {
		out = append(out, f.Name)
	}
	return out
}

func mustRef(t *testing.T, s string) Reference {
	t.Helper()
	r, err := ParseReference(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestArtifactTreeByTagAndDigest(t *testing.T) {
	reg := newRegistry(t)
	model, cfg, tok := randomBytes(300<<10), []byte(`{"hidden":1}`), []byte(`{"vocab":[]}`)
	img := reg.pushArtifact(t, "models/demo:v1",
		file("model.safetensors", model), file("config.json", cfg), file("tokenizer.json", tok))
	r, c := newResolver(t, reg)
	tree, err := r.Resolve(context.Background(), reg.Host, "models", mustRef(t, "demo:v1"))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"config.json", ManifestName, "model.safetensors", ConfigName, "tokenizer.json"}
	if got := names(tree); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("files %v, want %v", got, want)
	}
	d, _ := img.Digest()
	if string(tree.Manifest) != d.String() {
		t.Fatalf("manifest %s, want %s", tree.Manifest, d)
	}
	raw, _ := img.RawManifest()
	byName := map[string][]byte{"model.safetensors": model, "config.json": cfg, "tokenizer.json": tok, ManifestName: raw}
	for _, f := range tree.Files {
		if wantBytes, ok := byName[f.Name]; ok {
			if got := readFile(t, c, f); !bytes.Equal(got, wantBytes) {
				t.Fatalf("%s: %d bytes differ from what was pushed", f.Name, len(got))
			}
		}
	}
	// The same tree by digest.
	byDigest, err := r.Resolve(context.Background(), reg.Host, "models", mustRef(t, "demo@"+d.String()))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(names(byDigest), " ") != strings.Join(want, " ") || byDigest.Manifest != tree.Manifest {
		t.Fatalf("by digest: %v %s", names(byDigest), byDigest.Manifest)
	}
}

func TestArtifactTagIsAskedAgainAfterItsTTL(t *testing.T) {
	reg := newRegistry(t)
	one := reg.pushArtifact(t, "m:latest", file("a.bin", randomBytes(1000)))
	r, _ := newResolver(t, reg)
	now := time.Now()
	r.now = func() time.Time { return now }
	resolve := func() blob.Key {
		tree, err := r.Resolve(context.Background(), reg.Host, "", mustRef(t, "m:latest"))
		if err != nil {
			t.Fatal(err)
		}
		return tree.Manifest
	}
	d1, _ := one.Digest()
	if k := resolve(); string(k) != d1.String() {
		t.Fatalf("first: %s", k)
	}
	two := reg.pushArtifact(t, "m:latest", file("b.bin", randomBytes(1000)))
	d2, _ := two.Digest()
	asked := reg.TagRequests.Load()
	if k := resolve(); string(k) != d1.String() || reg.TagRequests.Load() != asked {
		t.Fatalf("within the TTL: %s after %d more tag requests; want the remembered %s and none", k, reg.TagRequests.Load()-asked, d1)
	}
	now = now.Add(DefaultTagTTL + time.Second)
	if k := resolve(); string(k) != d2.String() {
		t.Fatalf("after the TTL: %s, want the moved tag's %s", k, d2)
	}
}

func TestArtifactTitlesThatCannotBeNames(t *testing.T) {
	reg := newRegistry(t)
	img := reg.pushArtifact(t, "odd:v1",
		file("../escape", randomBytes(10)),
		file("a/b", randomBytes(11)),
		file("nul\x00byte", randomBytes(12)),
		file("same.bin", randomBytes(13)),
		file("same.bin", randomBytes(14)),
		file(ManifestName, randomBytes(15)),
		file("..", randomBytes(16)),
		file("", randomBytes(17)),
		file("fine.txt", randomBytes(18)))
	r, _ := newResolver(t, reg)
	tree, err := r.Resolve(context.Background(), reg.Host, "", mustRef(t, "odd:v1"))
	if err != nil {
		t.Fatal(err)
	}
	layers, _ := img.Layers()
	want := map[string]bool{ManifestName: true, ConfigName: true, "fine.txt": true}
	for _, l := range layers[:8] {
		d, _ := l.Digest()
		want["sha256-"+d.Hex] = true
	}
	if len(tree.Files) != len(want) {
		t.Fatalf("files %v, want %d names", names(tree), len(want))
	}
	for _, f := range tree.Files {
		if !want[f.Name] {
			t.Fatalf("file %q in %v: an unsafe, shared or reserved title became a name", f.Name, names(tree))
		}
	}
	if len(tree.Renamed) != 7 {
		t.Fatalf("renamed %d (%v), want 7 (the eighth had no title)", len(tree.Renamed), tree.Renamed)
	}
}

func TestArtifactIndexPicksThePlatform(t *testing.T) {
	reg := newRegistry(t)
	mk := func(tag string) v1.Image {
		return reg.pushArtifact(t, "multi:"+tag, file(tag+".bin", randomBytes(100)))
	}
	amd, arm := mk("amd64"), mk("arm64")
	artifacttest.PushIndex(t, reg.Host, "multi:v1",
		artifacttest.ForPlatform{Platform: v1.Platform{OS: "linux", Architecture: "arm64"}, Image: arm},
		artifacttest.ForPlatform{Platform: v1.Platform{OS: "linux", Architecture: "amd64"}, Image: amd})
	for _, arch := range []string{"amd64", "arm64"} {
		r, _ := newResolver(t, reg)
		r.opts.Platform = v1.Platform{OS: "linux", Architecture: arch}
		tree, err := r.Resolve(context.Background(), reg.Host, "", mustRef(t, "multi:v1"))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(strings.Join(names(tree), " "), arch+".bin") {
			t.Fatalf("%s node got %v", arch, names(tree))
		}
	}
	r, _ := newResolver(t, reg)
	r.opts.Platform = v1.Platform{OS: "linux", Architecture: "riscv64"}
	if _, err := r.Resolve(context.Background(), reg.Host, "", mustRef(t, "multi:v1")); !errors.Is(err, blob.ErrNotFound) || !strings.Contains(err.Error(), "riscv64") {
		t.Fatalf("index without the node's platform: %v", err)
	}
}

func TestArtifactRefusalsAndMisses(t *testing.T) {
	reg := newRegistry(t)
	reg.pushArtifact(t, "private/m:v1", file("x", randomBytes(10)))
	reg.pushArtifact(t, "public/m:v1", file("x", randomBytes(10)))
	deny := func(req *http.Request) bool { return strings.Contains(req.URL.Path, "/private/") }
	reg.Deny.Store(&deny)
	r, _ := newResolver(t, reg)
	ctx := context.Background()
	if _, err := r.Resolve(ctx, reg.Host, "private", mustRef(t, "m:v1")); !errors.Is(err, ErrDenied) {
		t.Fatalf("401 by tag: %v, want ErrDenied", err)
	}
	if _, err := r.Resolve(ctx, reg.Host, "public", mustRef(t, "m:v1")); err != nil {
		t.Fatalf("the registry's other repository: %v", err)
	}
	if _, err := r.Resolve(ctx, reg.Host, "public", mustRef(t, "m:nope")); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("unknown tag: %v", err)
	}
	if _, err := r.Resolve(ctx, reg.Host, "public", mustRef(t, "m@sha256:"+strings.Repeat("0", 64))); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("unknown digest: %v", err)
	}
	if _, err := r.Resolve(ctx, "127.0.0.9:1", "public", mustRef(t, "m:v1")); !errors.Is(err, blob.ErrNotFound) || !strings.Contains(err.Error(), "--registries") {
		t.Fatalf("a registry not allowed: %v", err)
	}
	long := strings.Repeat("a", 250)
	if _, err := r.Resolve(ctx, reg.Host, long, mustRef(t, "m:v1")); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("a repository over %d bytes: %v", MaxRepositoryLen, err)
	}
}

func TestArtifactManifestOverTheBound(t *testing.T) {
	big := append([]byte(`{"schemaVersion":2,"layers":[],"annotations":{"x":"`), bytes.Repeat([]byte("a"), MaxManifestBytes)...)
	big = append(big, `"}}`...)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		w.Header().Set("Docker-Content-Digest", "sha256:"+strings.Repeat("1", 64))
		http.ServeContent(w, req, "", time.Time{}, bytes.NewReader(big))
	}))
	defer srv.Close()
	reg := testRegistry{&artifacttest.Registry{URL: srv.URL, Host: strings.TrimPrefix(srv.URL, "http://")}}
	r, _ := newResolver(t, reg)
	for _, ref := range []string{"m:v1", "m@sha256:" + strings.Repeat("1", 64)} {
		_, err := r.Resolve(context.Background(), reg.Host, "", mustRef(t, ref))
		if !errors.Is(err, blob.ErrNotFound) || !strings.Contains(err.Error(), "over") {
			t.Fatalf("%s, a manifest of %d bytes: %v", ref, len(big), err)
		}
	}
}

func TestParseReference(t *testing.T) {
	good := map[string]Reference{
		"demo:v1":     {Name: "demo", Tag: "v1"},
		"a-b.c_d:V_1": {Name: "a-b.c_d", Tag: "V_1"},
		"demo@sha256:" + strings.Repeat("ab", 32): {Name: "demo", Digest: blob.Key("sha256:" + strings.Repeat("ab", 32))},
	}
	for in, want := range good {
		got, err := ParseReference(in)
		if err != nil || got != want {
			t.Errorf("%q: %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{
		"demo:", ":v1", "Demo:v1", "demo:-v1", "demo:" + strings.Repeat("t", 129), "demo@sha256:abc",
		"demo@md5:" + strings.Repeat("ab", 16), "demo@sha512:" + strings.Repeat("ab", 64), "de..mo:v1", "demo:v1:v2x/", "demo:v\x00",
	} {
		if r, err := ParseReference(in); err == nil {
			t.Errorf("%q parsed as %+v", in, r)
		}
	}
	for in, want := range map[string]bool{"models": true, "a.b-c__d": true, "A": false, "..": false, "-a": false, "a--b": true, strings.Repeat("a", 256): false} {
		if got := ValidRepoComponent(in); got != want {
			t.Errorf("ValidRepoComponent(%q) = %v", in, got)
		}
	}
}

func TestParseTarget(t *testing.T) {
	d := "sha256:" + strings.Repeat("cd", 32)
	good := map[string]Target{
		"10.0.0.5:5000/models/demo:v1": {Registry: "10.0.0.5:5000", Namespace: "models", Ref: Reference{Name: "demo", Tag: "v1"}},
		"ghcr.io/a/b/c@" + d:           {Registry: "ghcr.io", Namespace: "a/b", Ref: Reference{Name: "c", Digest: blob.Key(d)}},
		"localhost/m:latest":           {Registry: "localhost", Ref: Reference{Name: "m", Tag: "latest"}},
	}
	for in, want := range good {
		got, err := ParseTarget(in)
		if err != nil || got != want || got.String() != in {
			t.Errorf("%q: %+v (%s), %v; want %+v", in, got, got.String(), err, want)
		}
	}
	for _, in := range []string{"", "demo:v1", "ghcr.io/", "ghcr.io/models/demo", "ghcr.io/Models/demo:v1", "ghcr.io/a//b:v1", "ghcr.io/../b:v1", "ghcr.io/b:v1:x/y"} {
		if got, err := ParseTarget(in); err == nil {
			t.Errorf("%q parsed as %+v", in, got)
		}
	}
}

func TestArtifactBehindRegistryCredentials(t *testing.T) {
	for _, basic := range []bool{false, true} {
		reg := newRegistry(t)
		model := randomBytes(200 << 10)
		reg.pushArtifact(t, "private/m:v1", file("model.bin", model))
		reg.SetAuth(&artifacttest.Auth{Prefix: "private/", User: "alice", Pass: "s3cret-pass", Basic: basic})
		up := upstream.NewClient(upstream.Options{Logger: slog.New(slog.DiscardHandler)})
		for _, tc := range []struct {
			name, config string
			ok           bool
		}{
			{"no credentials", `{"auths":{}}`, false},
			{"wrong password", `{"auths":{"` + reg.Host + `":{"username":"alice","password":"wrong"}}}`, false},
			{"right", `{"auths":{"http://` + reg.Host + `":{"username":"alice","password":"s3cret-pass"}}}`, true},
		} {
			kc, err := regauth.Parse([]byte(tc.config), up.HTTPClient())
			if err != nil {
				t.Fatal(err)
			}
			r, c := newResolver(t, reg)
			r.opts.Auth = kc
			tree, err := r.Resolve(context.Background(), reg.Host, "private", mustRef(t, "m:v1"))
			if !tc.ok {
				if !errors.Is(err, ErrDenied) {
					t.Fatalf("basic=%v %s: %v, want ErrDenied", basic, tc.name, err)
				}
				if err != nil && strings.Contains(err.Error(), "s3cret") {
					t.Fatalf("the error shows the password: %v", err)
				}
				continue
			}
			if err != nil {
				t.Fatalf("basic=%v %s: %v", basic, tc.name, err)
			}
			tokens := reg.TokenRequests.Load()
			for _, f := range tree.Files {
				if f.Name == "model.bin" && !bytes.Equal(readFile(t, c, f), model) {
					t.Fatalf("basic=%v: model.bin differs", basic)
				}
			}
			if !basic && reg.TokenRequests.Load() != tokens {
				t.Fatalf("reading the files asked the token service %d more times; the token is kept", reg.TokenRequests.Load()-tokens)
			}
		}
	}
}

func TestArtifactConcurrentLookupsAskTheTagOnce(t *testing.T) {
	reg := newRegistry(t)
	reg.pushArtifact(t, "m:v1", file("a", randomBytes(10)))
	r, _ := newResolver(t, reg)
	before := reg.TagRequests.Load() // the push's
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := r.Resolve(context.Background(), reg.Host, "", mustRef(t, "m:v1")); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	// HEAD, and GET only when the registry names no digest: at most 2.
	if n := reg.TagRequests.Load() - before; n > 2 {
		t.Fatalf("20 concurrent lookups made %d tag requests", n)
	}
}
