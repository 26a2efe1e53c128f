package main

import (
	"math"
	"math/rand/v2"
	"net/http/httptest"
	"slices"
	"testing"
	"time"
)

// TestPacerNeverExceedsRate drives a pacer shared by several senders with
// an injected clock: in no window of time may more than burst + rate × its
// length be released, and senders that always want more must
// get most of the rate.
func TestPacerNeverExceedsRate(t *testing.T) {
	const rate, burst = 125_000_000, 256 << 10
	t0 := time.Unix(1_000_000, 0)
	clock := t0
	p := newPacer(rate, burst, func() time.Time { return clock })
	rng := rand.New(rand.NewPCG(1, 2))
	type release struct {
		at time.Time
		n  int
	}
	var out []release
	ready := make([]time.Time, 4) // when each sender asks next
	for i := range ready {
		ready[i] = t0
	}
	for range 20000 {
		s := 0 // the sender that asks first
		for i := range ready {
			if ready[i].Before(ready[s]) {
				s = i
			}
		}
		clock = ready[s]
		n := 1 + rng.IntN(pacePiece)
		at := clock.Add(p.reserve(n))
		out = append(out, release{at, n})
		// Sometimes a sender pauses, so the bucket also refills and caps.
		var pause time.Duration
		if rng.IntN(10) == 0 {
			pause = time.Duration(rng.IntN(5)) * time.Millisecond
		}
		ready[s] = at.Add(pause)
		// Now and then all pause: an idle bucket fills only up to its burst.
		if rng.IntN(1000) == 0 {
			for i := range ready {
				ready[i] = at.Add(50 * time.Millisecond)
			}
		}
	}
	slices.SortStableFunc(out, func(a, b release) int { return a.at.Compare(b.at) })
	// Over every window [T1, T2] between two releases: bytes released ≤
	// burst + rate×(T2 − T1). With S the bytes released up to and including
	// a release, that is S(j) − rate×T(j) − (S(i−1) − rate×T(i)) ≤ burst;
	// keep the smallest second term seen so far.
	var sum float64
	lowest := math.Inf(1)
	for j, r := range out {
		at := r.at.Sub(t0).Seconds()
		lowest = min(lowest, sum-rate*at)
		sum += float64(r.n)
		if over := sum - rate*at - lowest; over > burst+1 {
			t.Fatalf("release %d at +%.6f s: a window ending there let %.0f bytes more than burst + rate × its length", j, at, over-burst)
		}
	}
	el := out[len(out)-1].at.Sub(t0).Seconds()
	if el <= 0 || sum < 0.8*rate*el {
		t.Errorf("%.0f bytes in %.3f s: under 80%% of the rate %d B/s with senders always waiting", sum, el, rate)
	}
}

// TestPacedWriterPieces checks that a response body goes out in pieces no
// larger than one reservation, whole and in order.
func TestPacedWriterPieces(t *testing.T) {
	rec := &pieceRecorder{ResponseRecorder: httptest.NewRecorder()}
	w := pacedWriter{rec, newPacer(1<<50, pacePiece, time.Now)}
	body := make([]byte, 3*pacePiece+123)
	for i := range body {
		body[i] = byte(i * 7)
	}
	n, err := w.Write(body)
	if err != nil || n != len(body) {
		t.Fatalf("Write: %d, %v", n, err)
	}
	if !slices.Equal(rec.Body.Bytes(), body) {
		t.Error("body changed on the way through")
	}
	if len(rec.sizes) != 4 || slices.Max(rec.sizes) > pacePiece {
		t.Errorf("pieces %v, want 4 of at most %d", rec.sizes, pacePiece)
	}
}

type pieceRecorder struct {
	*httptest.ResponseRecorder
	sizes []int
}

func (r *pieceRecorder) Write(b []byte) (int, error) {
	r.sizes = append(r.sizes, len(b))
	return r.ResponseRecorder.Write(b)
}
