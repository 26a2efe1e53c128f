package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"testing"

	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/peerd-project/peerd/internal/reliability"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// A reader that opened a trusted chunk before a peer's bad chunk failed the
// blob's verification reads that chunk's bytes, never zeros.
func TestResetKeepsTrustedChunksUnderAReader(t *testing.T) {
	c := Must(Open(Options{Dir: t.TempDir(), ChunkSize: cs, ReadAhead: -1}))
	defer c.Close()
	data, k := randBlob(t, 3*cs)
	origin := newFake("upstream", true)
	origin.blobs[k] = data
	peer := newFake("peer", false)
	peer.origin = "badpeer"
	bad := append([]byte(nil), data...)
	bad[2*cs+7] ^= 0xff
	peer.blobs[k] = bad

	h := c.Open(k, origin.plan())
	if _, err := h.ReadAt(context.Background(), make([]byte, cs), 0); err != nil {
		t.Fatal(err)
	}
	lr, _, err := c.OpenLocal(k, 0, cs) // a peer's (or a face's) sendfile of trusted chunk 0
	if err != nil {
		t.Fatal(err)
	}
	defer lr.Close()
	hp := c.Open(k, peer.plan())
	fillInBackground(t, hp)
	waitFor(t, "mismatch", func() bool {
		return testutil.ToFloat64(c.m.verify.WithLabelValues("mismatch")) == 1
	})
	got, err := io.ReadAll(lr)
	if err != nil {
		t.Fatalf("reader of a kept chunk: %v", err)
	}
	if !bytes.Equal(got, data[:cs]) {
		t.Fatalf("reader of trusted chunk 0 got wrong bytes after the reset (zeros: %v)", bytes.Count(got, []byte{0}) == len(got))
	}
	if i := h.Info(); i.Present != cs {
		t.Fatalf("after the reset %d bytes present, want the trusted chunk's %d", i.Present, cs)
	}
	// The rest refills from the origin and the blob verifies.
	hp.Close()
	if got := readAll(t, h); !bytes.Equal(got, data) {
		t.Fatal("wrong bytes after refill")
	}
	waitFor(t, "verification", func() bool { return h.Info().Verified })
	h.Close()
	reliability.Record(t, reliability.Row{Area: "probe",
		Case:    "reset after a verification mismatch while a reader copies a trusted chunk",
		Outcome: "the reader gets the chunk's right bytes (trusted chunks kept, only the peer's discarded); the blob refills and verifies",
		Figure:  fmt.Sprintf("%d of %d bytes correct; %d bytes kept through the reset", len(got), cs, cs)})
}

// A size only a peer reported is forgotten when the peer's bytes fail
// verification: the origin's own size is then accepted.
func TestSizeFromAPeerForgottenOnMismatch(t *testing.T) {
	c := Must(Open(Options{Dir: t.TempDir(), ChunkSize: cs, ReadAhead: -1}))
	defer c.Close()
	data, k := randBlob(t, 3*cs)
	peer := newFake("peer", false)
	peer.origin = "badpeer"
	peer.blobs[k] = append(append([]byte(nil), data...), make([]byte, cs)...) // one chunk too long
	h := c.Open(k, peer.plan())
	fillInBackground(t, h)
	waitFor(t, "mismatch", func() bool {
		return testutil.ToFloat64(c.m.verify.WithLabelValues("mismatch")) == 1
	})
	h.Close()
	origin := newFake("upstream", true)
	origin.blobs[k] = data
	h2 := c.Open(k, origin.plan())
	defer h2.Close()
	size, err := h2.Size(context.Background())
	if err != nil || size != int64(len(data)) {
		t.Fatalf("size %d, %v; want the origin's %d", size, err, len(data))
	}
	if got := readAll(t, h2); !bytes.Equal(got, data) {
		t.Fatal("wrong bytes from the origin")
	}
	waitFor(t, "verification", func() bool { return h2.Info().Verified })
}

// fillInBackground fills the blob of h through its prefetch, with no reader
// that would fetch a discarded chunk again.
func fillInBackground(t testing.TB, h *Handle) {
	t.Helper()
	if _, err := h.Size(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.Prefetch(1)
}

// hashCheck compares what is written to it with want, from the start.
type hashCheck struct {
	want []byte
	n    int64
	bad  int64 // bytes that differed
}

func (w *hashCheck) Write(p []byte) (int, error) {
	for i := range p {
		if w.n+int64(i) >= int64(len(w.want)) || p[i] != w.want[w.n+int64(i)] {
			w.bad++
		}
	}
	w.n += int64(len(p))
	return len(p), nil
}

// tmpfsDir mounts a tmpfs of the given size (a filesystem that really
// returns ENOSPC) in a temporary folder, or skips when not root.
func tmpfsDir(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

// A cache on a filesystem smaller than --cache-size serves a blob bigger
// than the filesystem completely, evicts for the next blob, and works again
// after a restart.
func TestDiskFullServesCompleteAndRecovers(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 256 MiB")
	}
	root := tmpfsDir(t, "64m")
	const mib = 1 << 20
	reg := prometheus.NewRegistry()
	opts := Options{Dir: filepath.Join(root, "cache"), ChunkSize: mib, Registerer: reg, FlushInterval: 10 * time.Millisecond}
	c := Must(Open(opts))
	origin := newFake("upstream", true)
	big, kBig := randBlob(t, 256*mib)
	small, kSmall := randBlob(t, 24*mib)
	third, kThird := randBlob(t, 24*mib)
	origin.blobs[kBig], origin.blobs[kSmall], origin.blobs[kThird] = big, small, third
	ctx := context.Background()
	read := func(c *Cache, k blob.Key, want []byte) *hashCheck {
		t.Helper()
		h := c.Open(k, origin.plan())
		defer h.Close()
		w := &hashCheck{want: want}
		n, err := h.WriteRange(ctx, w, 0, int64(len(want)))
		if err != nil || n != int64(len(want)) || w.n != n || w.bad != 0 {
			t.Fatalf("read %s: %d of %d bytes, %d wrong, err %v", k, n, len(want), w.bad, err)
		}
		return w
	}
	w := read(c, kBig, big)
	full := testutil.ToFloat64(c.m.diskFull)
	if full == 0 {
		t.Fatal("the 64 MiB filesystem never reported full")
	}
	stored := c.Used()
	read(c, kSmall, small)
	evicted := testutil.ToFloat64(c.m.evictions)
	if evicted == 0 {
		t.Fatal("nothing evicted for the second blob")
	}
	if i, _ := c.Stat(kSmall); i.Present != int64(len(small)) {
		t.Fatalf("second blob: %d of %d bytes stored", i.Present, len(small))
	}
	c.Close()
	c2 := Must(Open(Options{Dir: opts.Dir, ChunkSize: mib, FlushInterval: 10 * time.Millisecond}))
	defer c2.Close()
	read(c2, kSmall, small)
	read(c2, kThird, third)
	read(c2, kBig, big)
	reliability.Record(t, reliability.Row{Area: "probe",
		Case:    "cache disk full (64 MiB tmpfs, default --cache-size) during a 256 MiB read",
		Outcome: "the read completes with the right bytes (what does not fit is served without being stored); the next blob evicts it and is stored; after a restart new and old blobs read correctly",
		Figure: fmt.Sprintf("%d of %d bytes correct, %d MiB stored; %.0f disk-full writes, %.0f evictions",
			w.n-w.bad, len(big), stored/mib, full, evicted)})
}

// A byte flipped in a verified blob's data file while peerd was stopped is
// never served by any of the cache's serving paths: the chunk fails its
// check on first read, is discarded and fetched again, and the blob
// verifies again.
func TestFlippedByteInAVerifiedBlobIsNeverServed(t *testing.T) {
	for _, face := range []string{"ReadAt", "WriteRange", "OpenLocal"} {
		t.Run(face, func(t *testing.T) {
			dir := t.TempDir()
			reg := prometheus.NewRegistry()
			opts := Options{Dir: dir, ChunkSize: cs, ReadAhead: -1, FlushInterval: 10 * time.Millisecond}
			c := Must(Open(opts))
			origin := newFake("upstream", true)
			data, k := randBlob(t, 4*cs+100)
			origin.blobs[k] = data
			h := c.Open(k, origin.plan())
			readAll(t, h)
			waitFor(t, "verification", func() bool { return h.Info().Verified })
			h.Close()
			c.Close()
			const at = 2*cs + 17
			f, err := os.OpenFile(filepath.Join(blobDir(dir, k), "data"), os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt([]byte{data[at] ^ 0x01}, at); err != nil {
				t.Fatal(err)
			}
			f.Close()

			opts.Registerer = reg
			c = Must(Open(opts))
			defer c.Close()
			if i, _ := c.Stat(k); !i.Verified {
				t.Fatal("the blob is not verified after the restart (its sums were not kept)")
			}
			before := origin.count(2 * cs)
			var got []byte
			switch face {
			case "ReadAt":
				h := c.Open(k, origin.plan())
				got = readAll(t, h)
				h.Close()
			case "WriteRange":
				h := c.Open(k, origin.plan())
				var b bytes.Buffer
				if _, err := h.WriteRange(context.Background(), &b, 0, int64(len(data))); err != nil {
					t.Fatal(err)
				}
				got = b.Bytes()
				h.Close()
			case "OpenLocal": // the peer server's, /v2/'s and FUSE's way in
				if lr, _, err := c.OpenLocal(k, 0, -1); err == nil {
					b, _ := io.ReadAll(lr)
					lr.Close()
					t.Fatalf("OpenLocal served the blob with a bad chunk (%d bytes, byte at %d is %#x, want %#x)", len(b), at, b[at], data[at])
				}
				h := c.Open(k, origin.plan()) // the faces' fallback: through the cache
				readAll(t, h)
				h.Close()
				lr, _, err := c.OpenLocal(k, 0, -1)
				if err != nil {
					t.Fatal(err)
				}
				got, _ = io.ReadAll(lr)
				lr.Close()
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("%s served wrong bytes (byte at %d is %#x, want %#x)", face, at, got[at], data[at])
			}
			if n := testutil.ToFloat64(c.m.corrupt); n != 1 {
				t.Fatalf("peerd_cache_corrupt_chunks_total = %v, want 1", n)
			}
			if origin.count(2*cs) != before+1 {
				t.Fatalf("the bad chunk was fetched %d times again, want once", origin.count(2*cs)-before)
			}
			waitFor(t, "verified again", func() bool { i, _ := c.Stat(k); return i.Verified })
			if face == "OpenLocal" {
				reliability.Record(t, reliability.Row{Area: "probe",
					Case:    "one byte flipped in a verified blob's data file while peerd was stopped",
					Outcome: "the chunk fails its check on first read after the start, is discarded (blob unverified, withdrawn) and fetched again; every serving path gives the right bytes; the blob verifies again",
					Figure:  fmt.Sprintf("%.0f corrupt chunk counted, %d of %d bytes correct", testutil.ToFloat64(c.m.corrupt), len(got), len(data))})
			}
		})
	}
}

// A blob verified by a version that kept no chunk sums is verified again at
// start, which records them.
func TestVerifiedBlobWithoutSumsIsVerifiedAgain(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, ChunkSize: cs, FlushInterval: 10 * time.Millisecond}
	c := Must(Open(opts))
	origin := newFake("upstream", true)
	data, k := randBlob(t, 3*cs+1)
	origin.blobs[k] = data
	h := c.Open(k, origin.plan())
	readAll(t, h)
	waitFor(t, "verification", func() bool { return h.Info().Verified })
	h.Close()
	c.Close()
	sums := filepath.Join(blobDir(dir, k), "sums")
	if err := os.Remove(sums); err != nil {
		t.Fatal(err)
	}
	c = Must(Open(opts))
	defer c.Close()
	waitFor(t, "verified again", func() bool { i, _ := c.Stat(k); return i.Verified })
	// The sums, then meta, are written after the blob is verified in memory.
	waitFor(t, "sums and meta written", func() bool {
		got, err := readSums(blobDir(dir, k), 4)
		m, merr := readMeta(blobDir(dir, k))
		return err == nil && len(got) == 4 && merr == nil && m.Verified
	})
}

// When every chunk came from trusted sources and the blob still fails
// verification, all are discarded: a reader that opened one before fails
// instead of passing on what a refill may write under it (never zeros).
func TestResetOfTrustedChunksFailsTheirReaders(t *testing.T) {
	c := Must(Open(Options{Dir: t.TempDir(), ChunkSize: cs, ReadAhead: -1}))
	defer c.Close()
	data, k := randBlob(t, 3*cs)
	bad := append([]byte(nil), data...)
	bad[cs+1] ^= 0xff
	origin := newFake("upstream", true)
	origin.blobs[k] = bad
	h := c.Open(k, origin.plan())
	defer h.Close()
	if _, err := h.ReadAt(context.Background(), make([]byte, cs), 0); err != nil {
		t.Fatal(err)
	}
	lr, _, err := c.OpenLocal(k, 0, cs)
	if err != nil {
		t.Fatal(err)
	}
	defer lr.Close()
	fillInBackground(t, h)
	waitFor(t, "mismatch", func() bool {
		return testutil.ToFloat64(c.m.verify.WithLabelValues("mismatch")) == 1
	})
	got, err := io.ReadAll(lr)
	if !errors.Is(err, errReset) {
		t.Fatalf("reader of a discarded trusted chunk: %d bytes (zeros: %v), err %v; want errReset",
			len(got), len(got) > 0 && bytes.Count(got, []byte{0}) == len(got), err)
	}
	if i := h.Info(); i.Present != 0 {
		t.Fatalf("%d bytes present after the reset, want none", i.Present)
	}
}
