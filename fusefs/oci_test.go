package fusefs

import (
	"bytes"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/peerd-project/peerd/artifact"
	"github.com/peerd-project/peerd/artifact/artifacttest"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/upstream"
)

// mountWithArtifacts mounts with an oci tree over reg; missing bytes come
// from the registry the tree names (the test's plan has no peers).
func mountWithArtifacts(t *testing.T, reg *artifacttest.Registry) (*testMount, string) {
	t.Helper()
	m := mountForTest(t, func(o *Options) {
		o.Plan = func(_ blob.Key, origin blob.Source) cache.Plan { return cache.Plan{Origin: origin} }
		o.Artifacts = artifact.New(artifact.Options{
			Registries: map[string]string{reg.Host: reg.URL},
			Upstream:   upstream.NewClient(upstream.Options{Logger: slog.New(slog.DiscardHandler)}),
			Cache:      o.Cache,
			Plan:       o.Plan,
			Logger:     o.Logger,
		})
	})
	return m, filepath.Join(m.fs.Mountpoint(), ociDirName, reg.Host)
}

func errnoOf(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return 0
}

func TestOCITreeReadsAnArtifactByTag(t *testing.T) {
	reg := artifacttest.NewRegistry(t)
	model := artifacttest.Random(3<<20 + 17)
	tok := []byte(`{"vocab":["a","b"]}`)
	img := artifacttest.Artifact(t, artifacttest.File{Title: "model.safetensors", Data: model},
		artifacttest.File{Title: "tokenizer.json", Data: tok}, artifacttest.File{Title: "../escape", Data: []byte("x")})
	digest := artifacttest.Push(t, reg.Host, "models/demo:v1", img)
	m, root := mountWithArtifacts(t, reg)

	// The oci folder lists the registries a reference may name.
	ents, err := os.ReadDir(filepath.Join(m.fs.Mountpoint(), ociDirName))
	if err != nil || len(ents) != 1 || ents[0].Name() != reg.Host {
		t.Fatalf("oci folder: %v, %v", ents, err)
	}
	dir := filepath.Join(root, "models", "demo:v1")
	ents, err = os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	layers, _ := img.Layers()
	esc, _ := layers[2].Digest()
	want := []string{artifact.ManifestName, "model.safetensors", artifact.ConfigName, "sha256-" + esc.Hex, "tokenizer.json"}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("ls %s: %v, want %v", dir, got, want)
	}
	b, err := os.ReadFile(filepath.Join(dir, "model.safetensors"))
	if err != nil || !bytes.Equal(b, model) {
		t.Fatalf("model.safetensors: %d bytes, %v", len(b), err)
	}
	checkRandomReads(t, filepath.Join(dir, "model.safetensors"), model, 7)
	if b, err := os.ReadFile(filepath.Join(dir, "tokenizer.json")); err != nil || !bytes.Equal(b, tok) {
		t.Fatalf("tokenizer.json: %q, %v", b, err)
	}
	raw, _ := img.RawManifest()
	if b, err := os.ReadFile(filepath.Join(dir, artifact.ManifestName)); err != nil || !bytes.Equal(b, raw) {
		t.Fatalf("manifest.json: %q, %v", b, err)
	}
	// The file is the blob's own node: the same inode as sha256/<hex>.
	ml, _ := layers[0].Digest()
	var a, c syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, "model.safetensors"), &a); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Stat(filepath.Join(m.dir, ml.Hex), &c); err != nil {
		t.Fatal(err)
	}
	if a.Ino != c.Ino || a.Size != int64(len(model)) {
		t.Fatalf("inode %d size %d under oci, inode %d under sha256", a.Ino, a.Size, c.Ino)
	}
	// By digest: the same files.
	ents, err = os.ReadDir(filepath.Join(root, "models", "demo@"+digest))
	if err != nil || len(ents) != len(want) {
		t.Fatalf("by digest: %v, %v", ents, err)
	}
	// Read-only like the rest of the mount.
	if err := os.Mkdir(filepath.Join(dir, "x"), 0o755); errnoOf(err) != syscall.EROFS {
		t.Fatalf("mkdir in a reference: %v, want EROFS", err)
	}
}

func TestOCITreeBadReferences(t *testing.T) {
	reg := artifacttest.NewRegistry(t)
	artifacttest.Push(t, reg.Host, "private/m:v1", artifacttest.Artifact(t, artifacttest.File{Title: "a", Data: []byte("a")}))
	deny := func(req *http.Request) bool { return strings.Contains(req.URL.Path, "/private/") }
	reg.Deny.Store(&deny)
	m, root := mountWithArtifacts(t, reg)
	for path, want := range map[string]syscall.Errno{
		filepath.Join(m.fs.Mountpoint(), ociDirName, "127.0.0.9:1", "m:v1"): syscall.ENOENT, // registry not allowed
		filepath.Join(root, "nope:v1"):                                      syscall.ENOENT, // no such repository
		filepath.Join(root, "Bad:v1"):                                       syscall.ENOENT, // not a repository name
		filepath.Join(root, "m:"):                                           syscall.ENOENT,
		filepath.Join(root, "m@sha256:abc"):                                 syscall.ENOENT,
		filepath.Join(root, "UPPER", "m:v1"):                                syscall.ENOENT,
		filepath.Join(root, strings.Repeat("a", 250), "m:v1"):               syscall.ENOENT, // repository over 255 bytes
		filepath.Join(root, "private", "m:v1"):                              syscall.EACCES, // the registry asks for credentials
	} {
		if _, err := os.ReadDir(path); errnoOf(err) != want {
			t.Errorf("ls %s: %v, want %v", strings.TrimPrefix(path, m.fs.Mountpoint()), err, want)
		}
	}
	// Namespaces are folders that list nothing (a registry cannot be listed).
	if ents, err := os.ReadDir(filepath.Join(root, "private")); err != nil || len(ents) != 0 {
		t.Fatalf("a namespace: %v, %v", ents, err)
	}
	// The mount still works for everything else.
	if _, err := os.ReadDir(m.dir); err != nil {
		t.Fatalf("sha256 folder after bad references: %v", err)
	}
}
