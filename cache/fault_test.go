package cache

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"testing"

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

	h := c.Open(k, origin)
	if _, err := h.ReadAt(context.Background(), make([]byte, cs), 0); err != nil {
		t.Fatal(err)
	}
	lr, _, err := c.OpenLocal(k, 0, cs) // a peer's (or a face's) sendfile of trusted chunk 0
	if err != nil {
		t.Fatal(err)
	}
	defer lr.Close()
	hp := c.Open(k, peer)
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
	h := c.Open(k, peer)
	fillInBackground(t, h)
	waitFor(t, "mismatch", func() bool {
		return testutil.ToFloat64(c.m.verify.WithLabelValues("mismatch")) == 1
	})
	h.Close()
	origin := newFake("upstream", true)
	origin.blobs[k] = data
	h2 := c.Open(k, origin)
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
