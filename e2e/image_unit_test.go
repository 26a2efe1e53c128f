package e2e

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The generated images must be what containerd unpacks: real tar layers
// whose digests are the config's diff_ids, referenced by a manifest whose
// digest the harness predicts. This runs without root or a cluster.
func TestGenerateImage(t *testing.T) {
	dir := t.TempDir()
	im, err := generateImage(dir, 3<<20, 3, 7)
	if err != nil {
		t.Fatal(err)
	}
	man, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(man); "sha256:"+hex.EncodeToString(sum[:]) != im.digest {
		t.Fatalf("manifest digest %s does not match its bytes", im.digest)
	}
	var m struct {
		MediaType string
		Config    descriptor
		Layers    []descriptor
	}
	if err := json.Unmarshal(man, &m); err != nil {
		t.Fatal(err)
	}
	if m.MediaType != "application/vnd.oci.image.manifest.v1+json" || len(m.Layers) != 3 {
		t.Fatalf("manifest: media type %q, %d layers", m.MediaType, len(m.Layers))
	}
	blob := func(d descriptor) string {
		t.Helper()
		p := filepath.Join(dir, "blobs", "sha256", strings.TrimPrefix(d.Digest, "sha256:"))
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if sum := sha256.Sum256(b); "sha256:"+hex.EncodeToString(sum[:]) != d.Digest || int64(len(b)) != d.Size {
			t.Fatalf("blob %s: %d bytes hashing elsewhere (descriptor says %d)", d.Digest, len(b), d.Size)
		}
		return p
	}
	var cfg struct {
		Architecture, OS string
		RootFS           struct {
			Type    string
			DiffIDs []string `json:"diff_ids"`
		}
	}
	cb, _ := os.ReadFile(blob(m.Config))
	if err := json.Unmarshal(cb, &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.RootFS.Type != "layers" || len(cfg.RootFS.DiffIDs) != 3 {
		t.Fatalf("config: %s", cb)
	}
	var total int64 = m.Config.Size + int64(len(man))
	seen := map[string]bool{}
	for i, l := range m.Layers {
		if l.MediaType != "application/vnd.oci.image.layer.v1.tar" || cfg.RootFS.DiffIDs[i] != l.Digest || im.layers[i] != l.Digest {
			t.Fatalf("layer %d: %+v, diff_id %s", i, l, cfg.RootFS.DiffIDs[i])
		}
		total += l.Size
		f, err := os.Open(blob(l))
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(f)
		hdr, err := tr.Next()
		if err != nil {
			t.Fatalf("layer %d is not a tar: %v", i, err)
		}
		data, err := io.ReadAll(tr)
		if err != nil || int64(len(data)) != hdr.Size || hdr.Size < 1<<20-2048 {
			t.Fatalf("layer %d: file %s of %d bytes, read %d (%v)", i, hdr.Name, hdr.Size, len(data), err)
		}
		// Random, and different in every layer: nothing compresses or dedups away.
		h := sha256.Sum256(data)
		if seen[string(h[:])] {
			t.Fatalf("layer %d repeats another layer's bytes", i)
		}
		seen[string(h[:])] = true
		if _, err := tr.Next(); err != io.EOF {
			t.Fatalf("layer %d holds more than one file (%v)", i, err)
		}
		f.Close()
	}
	if total != im.size {
		t.Fatalf("image size %d, blobs add up to %d", im.size, total)
	}
}

func TestParseKnobs(t *testing.T) {
	for in, want := range map[string]int64{"100MiB": 100 << 20, "1GiB": 1 << 30, "5MB": 5e6, "4096": 4096} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for in, want := range map[string]int64{"200mbit": 200e6, "1gbit": 1e9, "50mbps": 400e6, "1.5gbit": 1.5e9} {
		if got, err := tcRateBits(in); err != nil || got != want {
			t.Errorf("tcRateBits(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"fast", "0mbit", "-1mbit", ""} {
		if _, err := tcRateBits(bad); err == nil {
			t.Errorf("tcRateBits(%q) accepted", bad)
		}
	}
}
