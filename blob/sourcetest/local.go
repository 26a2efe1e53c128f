package sourcetest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/peerd-project/peerd/blob"
)

// Local is what this node holds and may serve to peers without fetching:
// the shape of p2p.LocalStore, which the cache (through the daemon's
// adapter) and the containerd store implement.
type Local interface {
	OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error)
}

// LocalOptions declare the differences p2p.LocalStore's doc allows.
type LocalOptions struct {
	// NoEmptyBlobs: the store never holds a zero-byte blob (it keeps
	// chunks, and such a blob has none), so OpenLocal of one answers
	// blob.ErrNotFound like any blob it does not hold. Without it an empty
	// blob given to the store must be served (size 0, no bytes).
	NoEmptyBlobs bool
}

// RunLocal checks a local store against the contract of p2p.LocalStore:
// OpenLocal returns bytes [off, off+n) (n < 0: to the end) and the blob's
// size, or an error wrapping blob.ErrNotFound at once when it does not hold
// them; it never fetches. newStore must hold exactly the blobs it is given.
func RunLocal(t *testing.T, opts LocalOptions, newStore func(t *testing.T, blobs map[blob.Key][]byte) Local) {
	b := NewBlobs()
	st := newStore(t, b.Data)

	open := func(t *testing.T, k blob.Key, off, n int64) fetched {
		t.Helper()
		return within(t, fmt.Sprintf("OpenLocal(%s, %d, %d)", k, off, n), func() fetched {
			rc, size, err := st.OpenLocal(k, off, n)
			return fetched{rc, size, err}
		})
	}
	expect := func(t *testing.T, k blob.Key, off, n int64) {
		t.Helper()
		data := b.Data[k]
		size := int64(len(data))
		f := open(t, k, off, n)
		if size == 0 && opts.NoEmptyBlobs {
			if !errors.Is(f.err, blob.ErrNotFound) {
				t.Fatalf("OpenLocal(empty blob, %d, %d) of a store that holds no empty blob: err %v, want blob.ErrNotFound", off, n, f.err)
			}
			if f.rc != nil {
				f.rc.Close()
				t.Errorf("OpenLocal returned a reader with its error: callers never close it")
			}
			return
		}
		if f.err != nil {
			t.Fatalf("OpenLocal(%d-byte blob, %d, %d): %v", size, off, n, f.err)
		}
		if f.size != size {
			t.Errorf("OpenLocal(%d-byte blob, %d, %d) reported size %d", size, off, n, f.size)
		}
		r := within(t, "reading the range", func() read { return readAll(f.rc) })
		if r.err != nil {
			t.Fatalf("reading OpenLocal(%d-byte blob, %d, %d): %v after %d bytes", size, off, n, r.err, len(r.data))
		}
		end := size
		if n >= 0 {
			end = min(off+n, size)
		}
		if want := data[off:end]; !bytes.Equal(r.data, want) {
			t.Fatalf("OpenLocal(%d-byte blob, %d, %d): got %d bytes, want %d (equal prefix: %d bytes)", size, off, n, len(r.data), len(want), commonPrefix(r.data, want))
		}
	}

	t.Run("WholeBlob", func(t *testing.T) {
		for _, k := range b.sorted() {
			expect(t, k, 0, -1)
			expect(t, k, 0, int64(len(b.Data[k])))
		}
	})

	t.Run("RangeInside", func(t *testing.T) {
		for _, k := range b.sorted() {
			size := int64(len(b.Data[k]))
			if size < 3 {
				continue
			}
			expect(t, k, 1, size-2)
			expect(t, k, size/3, size/3)
			expect(t, k, size-1, 1)
			expect(t, k, size/2, -1)
		}
	})

	t.Run("RangePastTheEnd", func(t *testing.T) {
		// A peer asking a small blob's first chunk asks more bytes than
		// the blob has (it does not know the size yet): it gets the bytes
		// up to the end, not a "don't have".
		for _, k := range b.sorted() {
			size := int64(len(b.Data[k]))
			expect(t, k, 0, size+1<<20)
			if size >= 2 {
				expect(t, k, size/2, size)
			}
		}
	})

	t.Run("UnknownKeyIsNotFound", func(t *testing.T) {
		f := open(t, missingKey(), 0, -1)
		if !errors.Is(f.err, blob.ErrNotFound) {
			t.Fatalf("OpenLocal of a blob the store does not hold: err %v, want one wrapping blob.ErrNotFound", f.err)
		}
		if f.rc != nil {
			f.rc.Close()
			t.Errorf("OpenLocal returned a reader with its error: callers never close it")
		}
		url := blob.Key("url:" + missingKey().Hex())
		if f := open(t, url, 0, 4096); !errors.Is(f.err, blob.ErrNotFound) {
			t.Fatalf("OpenLocal of an unheld url: key: err %v, want blob.ErrNotFound", f.err)
		}
	})

	t.Run("ConcurrentOpens", func(t *testing.T) {
		// The peer server serves many transfers at once.
		k := b.sorted()[len(b.Data)-1]
		readPiecesAtOnce(t, "concurrent opens", b.Data[k], func(off, n int64) (io.ReadCloser, error) {
			rc, _, err := st.OpenLocal(k, off, n)
			return rc, err
		})
	})

	t.Run("NoGoroutineLeft", func(t *testing.T) {
		const rounds, slack = 12, 4
		k := b.sorted()[len(b.Data)-1]
		round := func() {
			if f := open(t, k, 0, 1<<20); f.err == nil {
				readAll(f.rc)
			}
			if f := open(t, k, 1<<20, -1); f.err == nil {
				io.CopyN(io.Discard, f.rc, 1000)
				f.rc.Close()
			}
			open(t, missingKey(), 0, 4096)
		}
		round()
		base := settle(0)
		for range rounds {
			round()
		}
		if n := settle(base + slack); n > base+slack {
			t.Fatalf("%d goroutines after %d rounds, %d before: a call leaves goroutines behind\n%s", n, rounds, base, stacks())
		}
	})
}
