package p2p

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
)

type attempt struct {
	idx    int
	p      peer.AddrInfo
	rc     io.ReadCloser
	total  int64
	cancel context.CancelFunc
	err    error
}

// hedged asks providers one after the other: the next on an error or "don't
// have" at once, or after the hedge delay when the current one is slow. The
// first answer wins; the others are cancelled. It also returns the providers
// not yet asked, for resuming.
func (s *Source) hedged(ctx context.Context, ps []peer.AddrInfo, k blob.Key, off, n int64) (*attempt, []peer.AddrInfo, error) {
	return s.hedgedOpt(ctx, ps, k, off, n, true)
}

// hedgedOpt is hedged; learn says whether first-byte times feed the hedge
// delay (not for swarm requests, whose answers wait for in-flight chunks).
func (s *Source) hedgedOpt(ctx context.Context, ps []peer.AddrInfo, k blob.Key, off, n int64, learn bool) (*attempt, []peer.AddrInfo, error) {
	results := make(chan *attempt, len(ps))
	cancels := make([]context.CancelFunc, 0, len(ps))
	launch := func(p peer.AddrInfo) {
		actx, cancel := context.WithCancel(ctx)
		idx := len(cancels)
		cancels = append(cancels, cancel)
		go func() {
			start := s.now()
			rc, total, err := s.getter.GetRange(actx, p, k, off, n)
			if err == nil {
				if learn {
					s.lat.add(s.now().Sub(start))
				}
				s.succeeded(p.ID)
			}
			results <- &attempt{idx: idx, p: p, rc: rc, total: total, cancel: cancel, err: err}
		}()
	}
	next, inflight := 0, 0
	launch(ps[next])
	next, inflight = next+1, inflight+1
	timer := time.NewTimer(s.lat.hedgeDelay())
	defer timer.Stop()
	var errs []error
	allNotFound := true
	// drain closes what the attempts still in flight return; they were
	// cancelled, so they end soon.
	drain := func(left int) {
		if left == 0 {
			return
		}
		go func() {
			for i := 0; i < left; i++ {
				if r := <-results; r.rc != nil {
					r.rc.Close()
				}
			}
		}()
	}
	for {
		select {
		case r := <-results:
			inflight--
			if r.err == nil {
				for i, c := range cancels {
					if i != r.idx {
						c()
					}
				}
				drain(inflight)
				return r, slices.Clone(ps[next:]), nil
			}
			r.cancel()
			if errors.Is(r.err, ErrRangeNotSatisfiable) {
				// The asker's range is past the end: no provider can
				// serve it and this one is not at fault.
				for _, c := range cancels {
					c()
				}
				drain(inflight)
				return nil, nil, fmt.Errorf("%s range %d+%d: %w", k, off, n, r.err)
			}
			if ctx.Err() == nil {
				s.log.Debug("peer fetch failed; trying the next provider", "key", k, "peer", r.p.ID.String(), "off", off, "err", r.err)
			}
			errs = append(errs, fmt.Errorf("peer %s: %w", r.p.ID, r.err))
			if !errors.Is(r.err, blob.ErrNotFound) {
				allNotFound = false
				if ctx.Err() == nil {
					s.penalize(r.p.ID, r.err)
				}
			}
			if next < len(ps) {
				launch(ps[next])
				next, inflight = next+1, inflight+1
				resetTimer(timer, s.lat.hedgeDelay())
			} else if inflight == 0 {
				if err := ctx.Err(); err != nil {
					return nil, nil, err
				}
				err := errors.Join(errs...)
				if allNotFound {
					return nil, nil, fmt.Errorf("%s range %d+%d: %w (no provider holds it: %v)", k, off, n, blob.ErrNotFound, err)
				}
				// %v, not %w: a "don't have" among real failures must not
				// make the whole answer look like a clean ErrNotFound.
				return nil, nil, fmt.Errorf("%s range %d+%d from peers: %v", k, off, n, err)
			}
		case <-timer.C:
			if next < len(ps) {
				s.m.hedges.Inc()
				launch(ps[next])
				next, inflight = next+1, inflight+1
				timer.Reset(s.lat.hedgeDelay())
			}
		case <-ctx.Done():
			for _, c := range cancels {
				c()
			}
			drain(inflight)
			return nil, nil, ctx.Err()
		}
	}
}

func resetTimer(t *time.Timer, d time.Duration) {
	t.Stop()
	t.Reset(d)
}
