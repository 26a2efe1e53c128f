package p2p

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// hedgeProbe records what a hedge run did with its tries.
type hedgeProbe struct {
	mu        sync.Mutex
	started   []int
	cancelled []int
	dropped   []string
	hedges    atomic.Int32
}

// hedge is a hedge whose waits are delays in turn, the last one repeated.
func (p *hedgeProbe) hedge(delays ...time.Duration) hedge[string] {
	var n atomic.Int32
	return hedge[string]{
		delay: func() time.Duration {
			return delays[min(int(n.Add(1))-1, len(delays)-1)]
		},
		hedged: func() { p.hedges.Add(1) },
		drop: func(v string) {
			p.mu.Lock()
			p.dropped = append(p.dropped, v)
			p.mu.Unlock()
		},
	}
}

func (p *hedgeProbe) start(i int) {
	p.mu.Lock()
	p.started = append(p.started, i)
	p.mu.Unlock()
}

// blockUntilCancelled is a try that never answers by itself.
func (p *hedgeProbe) blockUntilCancelled(ctx context.Context, i int) (string, error) {
	<-ctx.Done()
	p.mu.Lock()
	p.cancelled = append(p.cancelled, i)
	p.mu.Unlock()
	return fmt.Sprintf("cancelled %d", i), ctx.Err()
}

func (p *hedgeProbe) lens() (started, cancelled, dropped int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.started), len(p.cancelled), len(p.dropped)
}

func noFailure(int, error) error { return nil }

func TestHedgeFailedTryMovesOnAtOnce(t *testing.T) {
	var p hedgeProbe
	var failedIdx []int
	// An hour's delay: only the failure can start the second try.
	win, asked, err := p.hedge(time.Hour).run(context.Background(), 3, func(ctx context.Context, i int) (string, error) {
		p.start(i)
		if i == 0 {
			return "", errors.New("refused")
		}
		return fmt.Sprint("body ", i), nil
	}, func(i int, err error) error { failedIdx = append(failedIdx, i); return nil })
	if err != nil || win.idx != 1 || win.v != "body 1" || asked != 2 {
		t.Fatalf("run = %+v, asked %d, %v; want try 1 to win with 2 asked", win, asked, err)
	}
	win.cancel()
	if len(failedIdx) != 1 || failedIdx[0] != 0 {
		t.Fatalf("failed called for %v, want [0]", failedIdx)
	}
	if h := p.hedges.Load(); h != 0 {
		t.Fatalf("%d hedges counted for a failure, want 0", h)
	}
}

func TestHedgeSlowTryIsHedgedAndCancelled(t *testing.T) {
	var p hedgeProbe
	// One short wait, then none that ends within the test.
	win, asked, err := p.hedge(time.Millisecond, time.Hour).run(context.Background(), 3, func(ctx context.Context, i int) (string, error) {
		p.start(i)
		if i == 0 {
			return p.blockUntilCancelled(ctx, i)
		}
		return "fast", nil
	}, noFailure)
	if err != nil || win.idx != 1 || win.v != "fast" || asked != 2 {
		t.Fatalf("run = %+v, asked %d, %v; want try 1 to win with 2 asked", win, asked, err)
	}
	if h := p.hedges.Load(); h != 1 {
		t.Fatalf("%d hedges counted, want 1", h)
	}
	// The slow try is cancelled and what it returns is released; the
	// winner's context stays alive for reading its body.
	waitFor(t, "slow try cancelled and dropped", func() bool { _, c, d := p.lens(); return c == 1 && d == 1 })
	win.cancel()
}

func TestHedgeWinnerContextOutlivesRun(t *testing.T) {
	var p hedgeProbe
	var winCtx context.Context
	win, _, err := p.hedge(time.Hour).run(context.Background(), 1, func(ctx context.Context, i int) (string, error) {
		winCtx = ctx
		return "body", nil
	}, noFailure)
	if err != nil {
		t.Fatal(err)
	}
	if winCtx.Err() != nil {
		t.Fatal("the winner's context was cancelled when run returned; its body could not be read")
	}
	win.cancel()
	if winCtx.Err() == nil {
		t.Fatal("the winner's cancel did not end its context")
	}
}

func TestHedgeLateSuccessIsDropped(t *testing.T) {
	var p hedgeProbe
	release := make(chan struct{})
	win, _, err := p.hedge(time.Millisecond).run(context.Background(), 2, func(ctx context.Context, i int) (string, error) {
		if i == 0 {
			<-release // answers only after the race is decided, ignoring its cancellation
			return "late", nil
		}
		return "winner", nil
	}, noFailure)
	if err != nil || win.v != "winner" {
		t.Fatalf("run = %+v, %v", win, err)
	}
	close(release)
	waitFor(t, "late success dropped", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return len(p.dropped) == 1 && p.dropped[0] == "late"
	})
	win.cancel()
}

func TestHedgeEveryTryFails(t *testing.T) {
	var p hedgeProbe
	failures := 0
	_, _, err := p.hedge(time.Hour).run(context.Background(), 3, func(ctx context.Context, i int) (string, error) {
		p.start(i)
		return "", fmt.Errorf("try %d failed", i)
	}, func(int, error) error { failures++; return nil })
	if !errors.Is(err, errTriesFailed) {
		t.Fatalf("err = %v, want errTriesFailed", err)
	}
	if s, _, _ := p.lens(); s != 3 || failures != 3 {
		t.Fatalf("%d tries started, %d failures seen; want 3 and 3", s, failures)
	}
}

func TestHedgeFailedCanEndTheRun(t *testing.T) {
	var p hedgeProbe
	stopErr := errors.New("nobody can serve this")
	_, _, err := p.hedge(time.Millisecond, time.Hour).run(context.Background(), 3, func(ctx context.Context, i int) (string, error) {
		p.start(i)
		if i == 0 {
			return p.blockUntilCancelled(ctx, i)
		}
		return "", errors.New("out of range")
	}, func(i int, err error) error { return stopErr })
	if !errors.Is(err, stopErr) {
		t.Fatalf("err = %v, want failed's error", err)
	}
	waitFor(t, "the try in flight cancelled", func() bool { _, c, _ := p.lens(); return c == 1 })
	if s, _, _ := p.lens(); s != 2 {
		t.Fatalf("%d tries started, want 2 (none after failed ended the run)", s)
	}
}

func TestHedgeContextEnds(t *testing.T) {
	var p hedgeProbe
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, _, err := p.hedge(time.Hour).run(ctx, 2, func(ctx context.Context, i int) (string, error) {
			p.start(i)
			return p.blockUntilCancelled(ctx, i)
		}, noFailure)
		errc <- err
	}()
	waitFor(t, "first try started", func() bool { s, _, _ := p.lens(); return s == 1 })
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return when its context ended")
	}
	waitFor(t, "try cancelled", func() bool { _, c, _ := p.lens(); return c == 1 })
}

// A try hedgeTo refuses never starts because the ones in flight are slow;
// it starts when one fails.
func TestHedgeToRefusedWaitsForAFailure(t *testing.T) {
	var p hedgeProbe
	h := p.hedge(time.Millisecond)
	h.hedgeTo = func(i int) bool { return i != 1 }
	release := make(chan struct{})
	done := make(chan struct{})
	var win hedgeWin[string]
	var asked int
	var err error
	go func() {
		defer close(done)
		win, asked, err = h.run(context.Background(), 3, func(ctx context.Context, i int) (string, error) {
			p.start(i)
			if i == 0 {
				<-release
				return "", errors.New("broke")
			}
			return fmt.Sprintf("try %d", i), nil
		}, noFailure)
	}()
	time.Sleep(50 * time.Millisecond) // fifty hedge delays
	if s, _, _ := p.lens(); s != 1 || p.hedges.Load() != 0 {
		t.Fatalf("%d tries started, %d hedges, while the refused try's turn came: want 1 and 0", s, p.hedges.Load())
	}
	close(release)
	<-done
	if err != nil || win.idx != 1 || asked != 2 {
		t.Fatalf("run = %+v, asked %d, %v; want try 1 to win after try 0 failed", win, asked, err)
	}
	win.cancel()
}
