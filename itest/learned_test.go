package itest

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A blob first asked for through /blobs/ (which names its origin) can be read
// whole through the mount by digest alone: the mount fills the chunks it
// lacks from the origin the node learned, without the client naming it.
func TestFUSEReadsFromLearnedOrigin(t *testing.T) {
	fuseNeedDevice(t)
	origin := NewOrigin(t, "")
	data, dg := RandomBlob(t, 24<<20+77)
	url := origin.Put(storagePath(dg), data) + "?sig=SECRET"
	mp := filepath.Join(t.TempDir(), "mnt")
	n := StartNode(t, NodeOpts{Mount: mp, Args: []string{"--upstream-allow", origin.Host}})
	if code, _, body := Get(t, "GET", n.URL("/blobs/"+url), map[string]string{"Range": "bytes=0-9"}); code != 206 || !bytes.Equal(body, data[:10]) {
		t.Fatalf("range through /blobs/: %d", code)
	}
	got, err := os.ReadFile(filepath.Join(mp, "sha256", strings.TrimPrefix(dg, "sha256:")))
	if err != nil {
		t.Fatalf("read through the mount: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("wrong bytes through the mount")
	}
	if origin.LastHeaders() == nil {
		t.Fatal("origin never asked")
	}
	// A digest nobody ever named an origin for stays unknown.
	_, other := RandomBlob(t, 100)
	if _, err := os.Stat(filepath.Join(mp, "sha256", strings.TrimPrefix(other, "sha256:"))); !os.IsNotExist(err) {
		t.Fatalf("unknown digest: %v, want ENOENT", err)
	}
}
