package p2p

import (
	"context"
	"errors"
	"time"
)

// hedge runs up to n tries of one request, one after the other: the next
// starts at once when a try fails, or after delay() when the tries in
// flight are slow. The first success wins and every other try is cancelled,
// so a slow provider costs a request at most the hedge delay and a failed
// one nothing.
type hedge[T any] struct {
	// delay is how long the tries in flight may take before the next
	// starts; it is asked again for every wait.
	delay func() time.Duration
	// hedged, when not nil, is called for each try started because the
	// ones in flight were slow (not because one failed).
	hedged func()
	// drop, when not nil, releases what a try returned after it lost the
	// race or the run ended without it (called in the background).
	drop func(T)
	// stuck, when not nil, is asked (in run's goroutine) every delay() while
	// no further try may start and some are still in flight: a non-nil return
	// ends the run at once with that error, cancelling them.
	stuck func() error
	// hedgeTo, when not nil, says whether try i may start because the ones
	// in flight are slow; when it may not, the run waits for those (try i
	// still starts when one fails).
	hedgeTo func(i int) bool
}

// hedgeWin is the try that won: its index, its value, and the cancel
// function of its context, which stays alive for the winner's use (reading a
// body) until the caller cancels it.
type hedgeWin[T any] struct {
	idx    int
	v      T
	cancel context.CancelFunc
}

// errTriesFailed is run's error when every try failed (and ctx did not end).
var errTriesFailed = errors.New("every try failed")

type hedgeResult[T any] struct {
	idx    int
	v      T
	err    error
	cancel context.CancelFunc
}

// run calls try(ctx, i) for i = 0, 1, ... < n as above, each in its own
// goroutine under its own child of ctx. failed is called, in run's
// goroutine, with each failed try; a non-nil return ends the run at once
// with that error. run returns the winner and how many tries it started
// (the caller's remaining candidates start there); errTriesFailed when
// every try failed; ctx's error when ctx ended first.
func (h hedge[T]) run(ctx context.Context, n int, try func(ctx context.Context, i int) (T, error), failed func(i int, err error) error) (hedgeWin[T], int, error) {
	results := make(chan hedgeResult[T], n)
	cancels := make([]context.CancelFunc, 0, n)
	launch := func() {
		actx, cancel := context.WithCancel(ctx)
		idx := len(cancels)
		cancels = append(cancels, cancel)
		go func() {
			v, err := try(actx, idx)
			results <- hedgeResult[T]{idx: idx, v: v, err: err, cancel: cancel}
		}()
	}
	// stop cancels every try but keep (-1: all) and releases, in the
	// background, what those still in flight return; cancelled, they end
	// soon.
	inflight := 0
	stop := func(keep int) {
		for i, c := range cancels {
			if i != keep {
				c()
			}
		}
		if left := inflight; left > 0 {
			go func() {
				for range left {
					if r := <-results; h.drop != nil {
						h.drop(r.v)
					}
				}
			}()
		}
	}
	var zero hedgeWin[T]
	if n <= 0 {
		return zero, 0, errTriesFailed
	}
	launch()
	inflight++
	timer := time.NewTimer(h.delay())
	defer timer.Stop()
	for {
		select {
		case r := <-results:
			inflight--
			if r.err == nil {
				stop(r.idx)
				return hedgeWin[T]{idx: r.idx, v: r.v, cancel: r.cancel}, len(cancels), nil
			}
			r.cancel()
			if err := failed(r.idx, r.err); err != nil {
				stop(-1)
				return zero, 0, err
			}
			if len(cancels) < n {
				launch()
				inflight++
				resetTimer(timer, h.delay())
			} else if inflight == 0 {
				if err := ctx.Err(); err != nil {
					return zero, 0, err
				}
				return zero, 0, errTriesFailed
			}
		case <-timer.C:
			if len(cancels) < n && (h.hedgeTo == nil || h.hedgeTo(len(cancels))) {
				if h.hedged != nil {
					h.hedged()
				}
				launch()
				inflight++
				timer.Reset(h.delay())
			} else if h.stuck != nil {
				if err := h.stuck(); err != nil {
					stop(-1)
					return zero, 0, err
				}
				timer.Reset(h.delay())
			}
		case <-ctx.Done():
			stop(-1)
			return zero, 0, ctx.Err()
		}
	}
}

func resetTimer(t *time.Timer, d time.Duration) {
	t.Stop()
	t.Reset(d)
}
