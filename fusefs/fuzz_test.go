package fusefs

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
)

// oneBlobCatalog knows one blob.
type oneBlobCatalog struct {
	k    blob.Key
	size int64
}

func (c oneBlobCatalog) List(context.Context) ([]cache.Info, error) {
	return []cache.Info{{Key: c.k, Size: c.size}}, nil
}

func (c oneBlobCatalog) Stat(_ context.Context, k blob.Key) (cache.Info, bool, error) {
	if k != c.k {
		return cache.Info{}, false, nil
	}
	return cache.Info{Key: k, Size: c.size, ModTime: time.Unix(1, 0)}, true, nil
}

// FuzzLookup sends LOOKUP requests for arbitrary names in <mount>/sha256
// through go-fuse's request bridge (what the kernel sends, without a
// mount): a name finds a file only when it is the 64 lowercase hex of a
// blob the node knows, with that blob's size and the same inode every
// time; any other name is ENOENT, never another errno or a panic.
func FuzzLookup(f *testing.F) {
	known := blob.Key("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
	for _, s := range []string{
		known.Hex(), strings.ToUpper(known.Hex()), "sha256:" + known.Hex(), known.Hex()[:63], known.Hex() + "0",
		known.Hex() + "\x00", "." + known.Hex(), "0000000000000000000000000000000000000000000000000000000000000000",
		"..", ".", "", "/", "sha256", strings.Repeat("a", 300), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85g",
	} {
		f.Add(s)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	c, err := cache.Open(cache.Options{Dir: filepath.Join(f.TempDir(), "cache"), ChunkSize: 64 << 10, MaxBytes: 1 << 30, Logger: log})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { c.Close() })
	fs := &FS{
		opts: Options{Cache: c, Catalogs: []Catalog{oneBlobCatalog{known, 12345}}, LookupTimeout: 5 * time.Second,
			Plan: func(blob.Key, blob.Source) cache.Plan { return cache.Plan{} }},
		log: log, m: newMetrics(nil), started: time.Now(),
	}
	fs.ctx, fs.cancel = context.WithCancel(context.Background())
	f.Cleanup(fs.cancel)
	fs.root = &rootNode{f: fs, readOnlyDir: readOnlyDir{readOnly{fs}}}
	raw := gofs.NewNodeFS(fs.root, &gofs.Options{})
	var dir fuse.EntryOut
	if st := raw.Lookup(nil, &fuse.InHeader{NodeId: fuse.FUSE_ROOT_ID}, dirName, &dir); st != fuse.OK {
		f.Fatalf("lookup %s: %v", dirName, st)
	}
	var knownIno uint64
	f.Fuzz(func(t *testing.T, name string) {
		if name == "." || name == ".." {
			return // the kernel resolves these itself; go-fuse answers them
		}
		var out fuse.EntryOut
		st := raw.Lookup(nil, &fuse.InHeader{NodeId: dir.NodeId}, name, &out)
		if name != known.Hex() {
			if st != fuse.Status(syscall.ENOENT) {
				t.Fatalf("lookup %q: %v, want ENOENT", name, st)
			}
			return
		}
		if st != fuse.OK || out.Attr.Size != 12345 || out.Attr.Mode&syscall.S_IFMT != syscall.S_IFREG || out.Attr.Mode&0o222 != 0 {
			t.Fatalf("lookup of the known blob: %v, attr %+v", st, out.Attr)
		}
		if knownIno == 0 {
			knownIno = out.Attr.Ino
		}
		if out.Attr.Ino != knownIno || out.Attr.Ino != inoOf(known) {
			t.Fatalf("inode %d, before %d, want %d", out.Attr.Ino, knownIno, inoOf(known))
		}
	})
}
