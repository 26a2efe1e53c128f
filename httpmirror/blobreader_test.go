package httpmirror

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
)

// memSource serves one blob to a cache as its origin.
type memSource struct{ data []byte }

func (memSource) Name() string { return "origin" }
func (s memSource) Fetch(_ context.Context, _ blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	end := min(off+n, int64(len(s.data)))
	return io.NopCloser(bytes.NewReader(s.data[off:end])), int64(len(s.data)), nil
}

// Every blobReader keeps one contract: the size, exactly the bytes of a
// range, an empty range, and Served counting what was written.
func TestBlobReaderContract(t *testing.T) {
	data := make([]byte, 200<<10+3)
	rand.Read(data)
	sum := sha256.Sum256(data)
	k := blob.Key("sha256:" + hex.EncodeToString(sum[:]))
	c, err := cache.Open(cache.Options{Dir: t.TempDir(), ChunkSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// The cache holds the blob verified, so the local-only reader serves it.
	h := c.Open(k, cache.Plan{Origin: memSource{data}})
	if _, err := h.WriteRange(context.Background(), io.Discard, 0, int64(len(data))); err != nil {
		t.Fatal(err)
	}
	h.Close()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if i, _ := c.Stat(k); i.Verified {
			break
		} else if time.Now().After(deadline) {
			t.Fatal("blob not verified")
		}
	}
	readers := map[string]func() blobReader{
		"cache handle": func() blobReader { return c.Open(k, cache.Plan{Origin: memSource{data}}) },
		"containerd":   func() blobReader { return &storeReader{b: memBlob{Reader: bytes.NewReader(data)}} },
		"cache local":  func() blobReader { return &cacheLocal{c: c, k: k, size: int64(len(data))} },
	}
	ctx := context.Background()
	for name, open := range readers {
		t.Run(name, func(t *testing.T) {
			r := open()
			if size, err := r.Size(ctx); err != nil || size != int64(len(data)) {
				t.Fatalf("Size = %d, %v", size, err)
			}
			var total int64
			for _, rg := range [][2]int64{{0, int64(len(data))}, {70000, 12345}, {int64(len(data)) - 1, 1}, {5, 0}} {
				var buf bytes.Buffer
				n, err := r.WriteRange(ctx, &buf, rg[0], rg[1])
				if err != nil || n != rg[1] || !bytes.Equal(buf.Bytes(), data[rg[0]:rg[0]+rg[1]]) {
					t.Fatalf("WriteRange(%d, %d) = %d, %v (bytes equal: %v)", rg[0], rg[1], n, err, bytes.Equal(buf.Bytes(), data[rg[0]:rg[0]+rg[1]]))
				}
				total += n
			}
			if got := r.Served().Total(); got != total {
				t.Fatalf("Served counts %d bytes, %d were written", got, total)
			}
			if h, ok := r.(*cache.Handle); ok {
				h.Close()
			}
		})
	}
}
