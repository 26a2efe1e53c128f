package fusefs

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/peerd-project/peerd/cache"
)

// TestFlippedByteNeverReachesTheMount: a byte flipped in a verified blob's
// cache file while peerd was stopped is not read through the mount, by
// passthrough or the local path: the open checks every chunk, the bad one
// is fetched again, and the file reads as the origin's bytes.
func TestFlippedByteNeverReachesTheMount(t *testing.T) {
	for _, pass := range []bool{true, false} {
		t.Run(fmt.Sprintf("passthrough=%v", pass), func(t *testing.T) {
			needFUSE(t)
			dir := filepath.Join(t.TempDir(), "cache")
			data := randomBytes(3, 6*testChunk+99)
			src := newFakeSource()
			k := src.add(data)
			c, err := cache.Open(cache.Options{Dir: dir, ChunkSize: testChunk, FlushInterval: 10 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			h := c.Open(k, cache.Plan{Peers: src})
			if _, err := h.WriteRange(context.Background(), &bytes.Buffer{}, 0, int64(len(data))); err != nil {
				t.Fatal(err)
			}
			waitVerified(t, c, k)
			h.Close()
			c.Close()
			const at = 4*testChunk + 5
			f, err := os.OpenFile(filepath.Join(dir, "blobs", "sha256", k.Hex(), "data"), os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt([]byte{data[at] ^ 0x80}, at)
			f.Close()

			m := mountWithCache(t, func(o *cache.Options) { o.Dir = dir }, func(o *Options) {
				o.DisablePassthrough = !pass
				o.BackingDir = dir
			})
			m.src.add(data)
			if i, _ := m.cache.Stat(k); !i.Verified {
				t.Fatal("blob not verified after the restart")
			}
			got, err := os.ReadFile(m.path(k))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("the mount served wrong bytes (byte at %d is %#x, want %#x)", at, got[at], data[at])
			}
			if fc := m.src.fetchCounts(); len(fc) != 1 || fc[4*testChunk] != 1 {
				t.Fatalf("fetches %v, want the bad chunk (at %d) once", fc, 4*testChunk)
			}
			waitVerified(t, m.cache, k)
			m.waitReleased(t, k)
			got, err = os.ReadFile(m.path(k))
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("read after verifying again: %v, equal %v", err, bytes.Equal(got, data))
			}
			if pass && !m.fs.Passthrough() {
				t.Logf("kernel did not grant FUSE passthrough; the local fallback was tested")
			}
		})
	}
}
