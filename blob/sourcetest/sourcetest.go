// Package sourcetest holds the contract tests every blob.Source and every
// local store must pass. An implementation's own tests call Run (or
// RunLocal) with a fixture that serves the blobs the suite hands it, so one
// set of checks holds every implementation to the same rules.
//
// The rules are those of the interfaces' doc comments and of the callers that
// depend on them (the cache's fill for sources; the peer data plane for local
// stores); each check names the rule it holds an implementation to.
package sourcetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
)

// errEarly marks a slow fetch that failed before the suite cancelled it.
var errEarly = errors.New("failed before its context was cancelled")

// Guard bounds every wait of the suite. It only keeps a broken
// implementation from hanging the test run; it is no timing assertion.
const Guard = 10 * time.Second

// SlowSize is the size of the slow blob: at the pace a fixture must keep to
// (see Blobs.Slow), reading all of it takes far longer than Guard.
const SlowSize = 1 << 30

// Blobs is what a fixture must serve.
type Blobs struct {
	// Data are the blobs the fixture holds, keyed by their sha256 digest.
	// They include an empty blob and blobs of a few sizes.
	Data map[blob.Key][]byte
	// Slow is one more blob the fixture holds, of SlowSize bytes (their
	// value is free: nothing verifies them), whose bytes its backend
	// delivers either never or in small pieces at least every 100 ms,
	// so no stall timeout of the implementation fires and only a
	// cancelled context ends a read of it within Guard.
	Slow blob.Key
}

// Fixture is an implementation under test, set up by its package's test.
type Fixture struct {
	// Source returns the source to ask for k. Most implementations serve
	// every key through one value; an origin client reads one URL, so its
	// fixture returns the source for k's URL.
	Source func(k blob.Key) blob.Source
}

// Options declare the differences the interface's doc allows.
type Options struct {
	// SizeMayBeUnknown lets Fetch report size -1 ("the source cannot
	// tell", as blob.Source allows); without it the size must be exact.
	SizeMayBeUnknown bool
}

// NewBlobs makes the blobs the suite asks a fixture to serve.
func NewBlobs() Blobs {
	b := Blobs{Data: map[blob.Key][]byte{}}
	for _, n := range []int{0, 1, 4096, 100_000, 3<<20 + 17} {
		data := make([]byte, n)
		rand.Read(data)
		b.Data[KeyOf(data)] = data
	}
	var seed [32]byte
	rand.Read(seed[:])
	b.Slow = blob.Key("sha256:" + hex.EncodeToString(seed[:]))
	return b
}

// KeyOf is the sha256 key of data.
func KeyOf(data []byte) blob.Key {
	sum := sha256.Sum256(data)
	return blob.Key("sha256:" + hex.EncodeToString(sum[:]))
}

// missingKey is a well-formed digest no fixture holds.
func missingKey() blob.Key {
	var seed [32]byte
	rand.Read(seed[:])
	return blob.Key("sha256:" + hex.EncodeToString(seed[:]))
}

// sorted lists the blobs smallest first, so failures name them stably.
func (b Blobs) sorted() []blob.Key {
	var ks []blob.Key
	for k := range b.Data {
		ks = append(ks, k)
	}
	for i := 1; i < len(ks); i++ {
		for j := i; j > 0 && len(b.Data[ks[j]]) < len(b.Data[ks[j-1]]); j-- {
			ks[j], ks[j-1] = ks[j-1], ks[j]
		}
	}
	return ks
}

// within runs f and fails the test if it does not return within Guard.
func within[T any](t *testing.T, what string, f func() T) T {
	t.Helper()
	ch := make(chan T, 1)
	go func() { ch <- f() }()
	select {
	case v := <-ch:
		return v
	case <-time.After(Guard):
		t.Fatalf("%s: no answer within %v", what, Guard)
		panic("unreachable")
	}
}

type fetched struct {
	rc   io.ReadCloser
	size int64
	err  error
}

type read struct {
	data []byte
	err  error
}

// readAll reads rc to its end (or error) and closes it.
func readAll(rc io.ReadCloser) read {
	data, err := io.ReadAll(rc)
	rc.Close()
	return read{data, err}
}

// Run checks src against blob.Source's contract. newFixture is called once;
// the fixture must live until the test ends (use t.Cleanup).
func Run(t *testing.T, opts Options, newFixture func(t *testing.T, b Blobs) Fixture) {
	b := NewBlobs()
	fx := newFixture(t, b)
	ctx := context.Background()

	fetch := func(t *testing.T, ctx context.Context, k blob.Key, off, n int64) fetched {
		t.Helper()
		return within(t, fmt.Sprintf("Fetch(%s, %d, %d)", k, off, n), func() fetched {
			rc, size, err := fx.Source(k).Fetch(ctx, k, off, n)
			return fetched{rc, size, err}
		})
	}
	checkSize := func(t *testing.T, k blob.Key, got int64) {
		t.Helper()
		want := int64(len(b.Data[k]))
		if got == want || (got == -1 && opts.SizeMayBeUnknown) {
			return
		}
		t.Errorf("Fetch of %d-byte %s reported size %d, want %d (blob.Source: the blob's total size, -1 only when the source cannot tell)", want, k, got, want)
	}
	// expect fetches [off, off+n) of k and checks the bytes are exactly
	// data[off:min(off+n, size)] followed by io.EOF.
	expect := func(t *testing.T, k blob.Key, off, n int64) {
		t.Helper()
		data := b.Data[k]
		f := fetch(t, ctx, k, off, n)
		if f.err != nil {
			t.Fatalf("Fetch(%d-byte blob, %d, %d): %v", len(data), off, n, f.err)
		}
		checkSize(t, k, f.size)
		r := within(t, "reading the range", func() read { return readAll(f.rc) })
		if r.err != nil {
			t.Fatalf("reading [%d, %d) of a %d-byte blob: %v after %d bytes (blob.Source: past the end the reader returns the bytes up to the end, then io.EOF)", off, off+n, len(data), r.err, len(r.data))
		}
		want := data[off:min(off+n, int64(len(data)))]
		if !bytes.Equal(r.data, want) {
			t.Fatalf("[%d, %d) of a %d-byte blob: got %d bytes, want %d (equal prefix: %d bytes)", off, off+n, len(data), len(r.data), len(want), commonPrefix(r.data, want))
		}
	}

	t.Run("Name", func(t *testing.T) {
		if name := fx.Source(b.sorted()[0]).Name(); name == "" || strings.ContainsAny(name, " \n") {
			t.Errorf("Name() = %q: it labels metrics and logs, so it must be one non-empty word", name)
		}
	})

	t.Run("WholeBlob", func(t *testing.T) {
		for _, k := range b.sorted() {
			// The cache asks for whole chunks; a first chunk larger than
			// a small blob is the usual first request.
			expect(t, k, 0, int64(len(b.Data[k]))+1<<20)
			if len(b.Data[k]) > 0 {
				expect(t, k, 0, int64(len(b.Data[k])))
			}
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
		}
	})

	t.Run("RangePastTheEnd", func(t *testing.T) {
		// blob.Source: when off+n runs past the end the reader returns
		// the bytes up to the end (a short read, then io.EOF).
		for _, k := range b.sorted() {
			size := int64(len(b.Data[k]))
			if size < 2 {
				continue
			}
			expect(t, k, size/2, size)
			expect(t, k, size-1, 4096)
		}
	})

	t.Run("ReadsInSmallPieces", func(t *testing.T) {
		// Callers read with buffers of any size; every Read returns bytes
		// or an error, and io.EOF comes once the range is delivered.
		k := b.sorted()[len(b.Data)-1]
		data := b.Data[k]
		f := fetch(t, ctx, k, 7, 1<<20)
		if f.err != nil {
			t.Fatal(f.err)
		}
		defer f.rc.Close()
		var got []byte
		buf := make([]byte, 1000)
		r := within(t, "reading in 1000-byte pieces", func() read {
			for zero := 0; ; {
				m, err := f.rc.Read(buf)
				got = append(got, buf[:m]...)
				if err != nil {
					return read{got, err}
				}
				if m == 0 {
					if zero++; zero > 100 {
						return read{got, errors.New("100 reads in a row returned 0 bytes and no error")}
					}
				}
			}
		})
		if r.err != io.EOF {
			t.Fatalf("after %d bytes: %v, want io.EOF", len(r.data), r.err)
		}
		if !bytes.Equal(r.data, data[7:7+1<<20]) {
			t.Fatalf("got %d bytes, not the range's", len(r.data))
		}
	})

	t.Run("UnknownKeyIsNotFound", func(t *testing.T) {
		// blob.Source: a source that does not hold the blob returns an
		// error wrapping ErrNotFound, quickly (the caller moves on).
		k := missingKey()
		f := fetch(t, ctx, k, 0, 1<<20)
		if !errors.Is(f.err, blob.ErrNotFound) {
			t.Fatalf("Fetch of a blob nobody holds: err %v, want one wrapping blob.ErrNotFound", f.err)
		}
		if f.rc != nil {
			f.rc.Close()
			t.Errorf("Fetch returned a reader with its error: callers never close it")
		}
		// Asked again (a source may remember the answer): same answer.
		if f := fetch(t, ctx, k, 4096, 4096); !errors.Is(f.err, blob.ErrNotFound) {
			t.Fatalf("second Fetch of a blob nobody holds: err %v, want blob.ErrNotFound", f.err)
		}
	})

	t.Run("ConcurrentFetches", func(t *testing.T) {
		// The cache fills several chunks of one blob at once (read-ahead)
		// from the same source.
		k := b.sorted()[len(b.Data)-1]
		readPiecesAtOnce(t, "concurrent fetches", b.Data[k], func(off, n int64) (io.ReadCloser, error) {
			rc, _, err := fx.Source(k).Fetch(ctx, k, off, n)
			return rc, err
		})
	})

	t.Run("CancelWhileReading", func(t *testing.T) {
		// A caller that gives up (a fill's deadline, a client gone)
		// cancels its context: the fetch and its reader end at once,
		// with an error, however slow the backend is.
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		var cancelled atomic.Bool
		started := make(chan struct{})
		done := make(chan error, 1)
		go func() {
			rc, _, err := fx.Source(b.Slow).Fetch(cctx, b.Slow, 0, SlowSize)
			close(started)
			if err != nil {
				if !cancelled.Load() {
					err = fmt.Errorf("Fetch of the slow blob %w (the fixture must hold it): %w", errEarly, err)
				}
				done <- err
				return
			}
			r := readAll(rc)
			if r.err == nil {
				r.err = fmt.Errorf("read all %d bytes of the slow blob, with no error", len(r.data))
			} else if !cancelled.Load() {
				r.err = fmt.Errorf("reading the slow blob %w, after %d bytes (it must be slow, never quiet long enough for a timeout): %w", errEarly, len(r.data), r.err)
			}
			done <- r.err
		}()
		// Cancel while the read is under way (or the fetch waits).
		select {
		case <-started:
		case <-time.After(200 * time.Millisecond):
		}
		time.Sleep(50 * time.Millisecond)
		cancelled.Store(true)
		cancel()
		select {
		case err := <-done:
			if err == nil {
				t.Fatal("a cancelled read of the slow blob ended without an error")
			}
			if errors.Is(err, errEarly) {
				t.Fatal(err)
			}
		case <-time.After(Guard):
			t.Fatalf("a read of the slow blob went on for %v after its context was cancelled", Guard)
		}
	})

	t.Run("CancelledBeforeFetch", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		err := within(t, "Fetch with a cancelled context", func() error {
			rc, _, err := fx.Source(b.Slow).Fetch(cctx, b.Slow, 0, SlowSize)
			if err != nil {
				return err
			}
			if r := readAll(rc); r.err != nil {
				return r.err
			}
			return nil
		})
		if err == nil {
			t.Fatal("reading the slow blob with a cancelled context ended without an error")
		}
	})

	t.Run("NoGoroutineLeft", func(t *testing.T) {
		// Each round does what callers do: read a range whole, give up on
		// one half-way, ask for a blob nobody holds, cancel a slow read.
		// A goroutine left per call shows as growth with the rounds;
		// background work of the fixture stays within the slack.
		const rounds, slack = 12, 4
		k := b.sorted()[len(b.Data)-1]
		round := func() {
			if f := fetch(t, ctx, k, 0, 1<<20); f.err == nil {
				readAll(f.rc)
			}
			if f := fetch(t, ctx, k, 1<<20, 1<<20); f.err == nil {
				io.CopyN(io.Discard, f.rc, 1000)
				f.rc.Close()
			}
			fetch(t, ctx, missingKey(), 0, 4096)
			cctx, cancel := context.WithCancel(ctx)
			time.AfterFunc(20*time.Millisecond, cancel)
			if f := fetch(t, cctx, b.Slow, 0, SlowSize); f.err == nil {
				within(t, "reading the slow blob after cancel", func() read { return readAll(f.rc) })
			}
			cancel()
		}
		round() // connections a source keeps for reuse are made here
		base := settle(0)
		for range rounds {
			round()
		}
		if n := settle(base + slack); n > base+slack {
			t.Fatalf("%d goroutines after %d rounds, %d before: a call leaves goroutines behind\n%s", n, rounds, base, stacks())
		}
	})
}

// settle waits (up to Guard) for the goroutine count to fall to want and
// returns the count; want 0 waits for it to stop falling.
func settle(want int) int {
	deadline := time.Now().Add(Guard)
	n := runtime.NumGoroutine()
	for time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		m := runtime.NumGoroutine()
		if want > 0 && m <= want {
			return m
		}
		if want == 0 && m >= n {
			return m
		}
		n = m
	}
	return n
}

func stacks() string {
	buf := make([]byte, 1<<20)
	s := string(buf[:runtime.Stack(buf, true)])
	if len(s) > 32<<10 {
		s = s[:32<<10] + "\n..."
	}
	return s
}

func commonPrefix(a, b []byte) int {
	i := 0
	for i < len(a) && i < len(b) && a[i] == b[i] {
		i++
	}
	return i
}

// readPiecesAtOnce reads data in 256 KiB pieces, all at once, through open
// and reports every piece that fails or differs.
func readPiecesAtOnce(t *testing.T, what string, data []byte, open func(off, n int64) (io.ReadCloser, error)) {
	t.Helper()
	size := int64(len(data))
	const piece = 256 << 10
	var wg sync.WaitGroup
	errs := make(chan error, size/piece+1)
	for off := int64(0); off < size; off += piece {
		wg.Go(func() {
			rc, err := open(off, piece)
			if err != nil {
				errs <- fmt.Errorf("at %d: %w", off, err)
				return
			}
			r := readAll(rc)
			if r.err != nil {
				errs <- fmt.Errorf("reading at %d: %w", off, r.err)
			} else if !bytes.Equal(r.data, data[off:min(off+piece, size)]) {
				errs <- fmt.Errorf("at %d: wrong bytes (%d)", off, len(r.data))
			}
		})
	}
	within(t, what, func() bool { wg.Wait(); return true })
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
