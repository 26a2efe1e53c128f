package p2p

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus"
)

// providerFinder looks up the peers that advertise a blob. It returns what it
// found when ctx ends (an empty list is not an error). first, when not nil,
// is called (at most once, synchronously, without keeping the slice) with the
// providers found so far as soon as there is one.
type providerFinder interface {
	FindProviders(ctx context.Context, k blob.Key, first func([]peer.AddrInfo)) ([]peer.AddrInfo, error)
}

// rangeGetter reads a byte range of a blob from one peer; a peer that does not
// hold it yields an error wrapping blob.ErrNotFound.
type rangeGetter interface {
	GetRange(ctx context.Context, ai peer.AddrInfo, k blob.Key, off, n int64) (io.ReadCloser, int64, error)
}

var (
	_ blob.Source = (*Source)(nil)
	_ blob.Blamer = (*Source)(nil)
	_ blob.Swarm  = (*Source)(nil)
)

// Source reads blob bytes from the peers that hold them. It implements
// blob.Source (Name "peer") and blob.Blamer; its readers implement
// blob.Attributed.
type Source struct {
	self    peer.ID
	finder  providerFinder
	getter  rangeGetter
	m       *metrics
	log     *slog.Logger
	timeout time.Duration
	retries int
	gather  time.Duration // see SetSwarmGather
	hedge   time.Duration // see SetMissHedge
	now     func() time.Time
	after   func(time.Duration) <-chan time.Time // the gather window's end (tests end it by hand)
	bg      context.Context                      // bounds background refreshes (the node's lifetime)

	swarmChunks *prometheus.CounterVec

	mu    sync.Mutex
	provs map[blob.Key]*provEntry
	avoid map[peer.ID]avoidEntry
	lat   latencies
	// busyWait bounds how long a fetch waits for a turn when every holder
	// is busy before it answers "don't have" (SetBusyWait).
	busyWait time.Duration
	// noSpread keeps the DHT's order of providers (tests that name the
	// provider asked first).
	noSpread bool
	// zones, when set, puts holders in this node's zone first;
	// learnZones asks, in the background, the zones not known yet.
	zones      *zones
	learnZones func([]peer.AddrInfo)
	// crossing: blobs for which an asker of this node's zone is being
	// served from another zone, until when (markCrossing).
	crossing deadlines
	// whole: blobs a provider lately said it holds whole, until when
	// (markWhole).
	whole deadlines
	// expected: blobs whose image manifest came from a peer (ExpectHeld).
	expected deadlines
	// crosserWait: for each blob, until when this node waits for its zone's
	// designated crosser to show up as a provider (zoneGate).
	crosserWait deadlines
	// probes: blobs whose first fetch is finding out whether a whole copy
	// exists; closed when it knows (zoneProbe).
	probes map[blob.Key]chan struct{}
}

func newSource(self peer.ID, f providerFinder, g rangeGetter, m *metrics, log *slog.Logger, timeout time.Duration, retries int) *Source {
	if m == nil {
		m = newMetrics(nil)
	}
	if log == nil {
		log = slog.Default()
	}
	return &Source{self: self, finder: f, getter: g, m: m, log: log, timeout: timeout, retries: retries,
		gather: swarmGather, hedge: defaultMissHedge, busyWait: defaultBusyWait, now: time.Now, after: time.After, bg: context.Background(), swarmChunks: newSwarmChunks(), provs: map[blob.Key]*provEntry{}, avoid: map[peer.ID]avoidEntry{}}
}

// Name labels the source in metrics and logs.
func (s *Source) Name() string { return "peer" }

// SetSwarmGather sets how long after a swarm pull's empty first lookup the
// pull's other chunks look again for nodes that started at the same moment
// (default 250 ms; 0: never, they use the empty answer). Call before use.
func (s *Source) SetSwarmGather(d time.Duration) { s.gather = max(d, 0) }

// SetMissHedge sets how long a swarm pull's first chunk waits for the
// blob's first lookup before it starts from the origin anyway (default
// 10 ms; the lookup's answer may still hand the chunk to a peer). A longer
// hedge saves origin bytes when the DHT is slow, at the price of a cold
// miss's first byte; d <= 0 restores the default. Call before use.
func (s *Source) SetMissHedge(d time.Duration) {
	if d <= 0 {
		d = defaultMissHedge
	}
	s.hedge = d
}

// defaultBusyWait is the busy wait without SetBusyWait: --swarm-wait's default.
const defaultBusyWait = 8 * time.Second

// SetBusyWait sets how long a fetch waits for its turn when every provider
// holding the bytes answers "busy" before the origin is tried (the daemon
// passes --swarm-wait); d <= 0 asks each provider once. Call before use.
func (s *Source) SetBusyWait(d time.Duration) { s.busyWait = max(d, 0) }

// Fetch reads bytes [off, off+n) of k from a peer that holds them, trying
// providers in order and hedging a slow one. It returns the blob's size.
func (s *Source) Fetch(ctx context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	if !k.Verifiable() {
		return nil, -1, fmt.Errorf("%s: %w (only digests are shared)", k, blob.ErrNotFound)
	}
	ps := s.order(s.providers(ctx, k))
	if len(ps) == 0 {
		if err := ctx.Err(); err != nil {
			return nil, -1, err
		}
		return nil, -1, fmt.Errorf("%s: %w (no peer advertises it)", k, blob.ErrNotFound)
	}
	// Each chunk starts at a holder of its own (spread), so the nodes
	// reading a blob do not all start at the holder the DHT lists first.
	again := func() []peer.AddrInfo {
		// While this node waits for its zone's copy, a list at most
		// zoneRefresh old: the zone's other pullers announce by the second.
		var maxAge time.Duration
		if s.zoneWaiting(k) {
			maxAge = zoneRefresh
		}
		return s.spread(k, off, s.order(s.providersWithin(ctx, k, maxAge)))
	}
	res, rest, err := s.hedgedOpt(ctx, s.spread(k, off, ps), again, k, off, n, true)
	if err != nil {
		return nil, -1, err
	}
	want := n
	if n < 0 || n > res.total-off {
		want = res.total - off
	}
	return &peerReader{s: s, ctx: ctx, k: k, off: off, want: want, total: res.total,
		cur: res, rest: rest, held: res.held, origins: []string{res.p.ID.String()}}, res.total, nil
}

// attempt is one provider's answer to a range request: the body being read,
// the blob's size, and the cancel function of the request's context.
type attempt struct {
	p      peer.AddrInfo
	rc     io.ReadCloser
	total  int64
	cancel context.CancelFunc
	held   []peer.AddrInfo // holders that sent the fetch to wait for others
}

// hedgedOpt asks providers one after the other: the next on an error or
// "don't have" at once, or after the hedge delay when the current one is
// slow. The first answer wins; the others are cancelled. It also returns
// the providers not yet asked, for resuming. learn says whether first-byte times feed the hedge
// delay (not for swarm requests, whose answers wait for in-flight chunks).
// When every holder answers "busy", it waits its turn and asks again (the
// list again gives, when non-nil: holders come and go), up to the busy
// wait; then the answer is "don't have", and the origin fills the chunk.
// When a holder sent it to wait for other askers of the blob (fan-out or
// zone, see uploads.go) it waits at most fanoutWait (for its zone's copy:
// the busy wait) and does not go to the origin after the wait: it asks
// every holder once more, insisting, and is served.
func (s *Source) hedgedOpt(ctx context.Context, ps []peer.AddrInfo, again func() []peer.AddrInfo, k blob.Key, off, n int64, learn bool) (*attempt, []peer.AddrInfo, error) {
	var start time.Time
	insisted, forOthers, forZone := false, false, false
	var held []peer.AddrInfo // holders that sent us to wait for others
	if wait, probed := s.zoneProbe(k, ps); wait != nil {
		select {
		case <-wait:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-s.after(zoneProbeWait):
		}
	} else if probed != nil {
		defer probed() // (idempotent) also when the first answer is an error
		s.probeWhole(ctx, ps, k, off)
	}
	for {
		ask, gated, rctx := ps, false, ctx
		if insisted || s.zoneCrosser(k, ps) {
			rctx = insist(ctx)
		} else {
			ask, gated = s.zoneGate(k, ps)
		}
		res, rest, err := s.hedgedOnce(rctx, ask, k, off, n, learn)
		s.endZoneProbe(k)
		var be *BusyError
		busy := errors.As(err, &be)
		if err == nil || insisted || !(busy || gated && errors.Is(err, blob.ErrNotFound)) {
			if !start.IsZero() {
				s.m.busyWait.Observe(s.now().Sub(start).Seconds())
			}
			if res != nil {
				res.held = addMissing(res.held, held)
			}
			if busy && insisted {
				// Busy even to an insisting asker: the origin's turn.
				err = fmt.Errorf("%s range %d+%d: %w (every holder busy: %v)", k, off, n, blob.ErrNotFound, err)
			}
			return res, rest, err
		}
		if busy && be.waitsForOthers() {
			s.markWhole(k)
		}
		if busy && be.Reason == "zone" || gated {
			// Renewed while this fetch waits for its zone's copy.
			s.markCrossing(k)
		}
		forOthers = forOthers || gated || busy && be.waitsForOthers()
		forZone = forZone || gated || busy && be.Reason == "zone"
		if start.IsZero() {
			start = s.now()
		}
		waited := s.now().Sub(start)
		limit := s.busyWait
		if forOthers && !forZone {
			// Waiting for the zone's copy may take the whole --swarm-wait:
			// crossing zones again costs more than waiting.
			limit = min(limit, fanoutWait)
		}
		if waited >= limit {
			if forOthers {
				s.log.Debug("waited for other askers' copy; insisting", "key", k, "off", off, "waited", waited.Round(time.Millisecond), "zone", forZone, "providers", len(ps))
				insisted = true
				continue
			}
			s.m.busyWait.Observe(waited.Seconds())
			return nil, nil, fmt.Errorf("%s range %d+%d: %w (every holder busy for %s)", k, off, n, blob.ErrNotFound, waited.Round(time.Millisecond))
		}
		delay := fanoutRetry
		if busy {
			delay = be.RetryAfter
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-s.after(min(delay, limit-waited)):
		}
		if busy {
			held = addMissing(held, be.holders)
		}
		if again != nil {
			// Holders come and go, but one that sent us to wait for
			// others is asked again even when a fresh list lacks it: it
			// holds the blob, and "don't have" from the rest must not send
			// the chunk to the origin.
			others := !onlyHolders(ps, held)
			ps = addMissing(again(), held)
			if others && onlyHolders(ps, held) && forOthers && !forZone {
				// The other providers, whose copies we were waiting for,
				// dropped out of the list (they failed when asked, or
				// left): waiting out fanoutWait would only stall the pull.
				s.log.Debug("no other provider left to wait for; insisting", "key", k, "off", off, "waited", s.now().Sub(start).Round(time.Millisecond))
				insisted = true
			}
		}
	}
}

// addMissing appends to ps the peers of more it lacks.
func addMissing(ps, more []peer.AddrInfo) []peer.AddrInfo {
	for _, m := range more {
		if !slices.ContainsFunc(ps, func(p peer.AddrInfo) bool { return p.ID == m.ID }) {
			ps = append(ps, m)
		}
	}
	return ps
}

// onlyHolders reports whether every provider in ps is one of held.
func onlyHolders(ps, held []peer.AddrInfo) bool {
	for _, p := range ps {
		if !slices.ContainsFunc(held, func(h peer.AddrInfo) bool { return h.ID == p.ID }) {
			return false
		}
	}
	return len(held) > 0
}

// hedgedOnce asks every provider once (hedgedOpt). When no provider served
// and at least one was busy, the error is the busy answer worseBusy keeps.
func (s *Source) hedgedOnce(ctx context.Context, ps []peer.AddrInfo, k blob.Key, off, n int64, learn bool) (*attempt, []peer.AddrInfo, error) {
	type body struct {
		rc    io.ReadCloser
		total int64
	}
	h := hedge[body]{
		delay:   s.lat.hedgeDelay,
		hedged:  s.m.hedges.Inc,
		hedgeTo: func(i int) bool { return !s.otherZone(ps[i]) },
		drop: func(b body) {
			if b.rc != nil {
				b.rc.Close()
			}
		},
	}
	get := func(actx context.Context, i int) (body, error) {
		start := s.now()
		rc, total, err := s.getter.GetRange(actx, ps[i], k, off, n)
		if wb, ok := rc.(wholeBody); ok && err == nil && wb.fromWhole() {
			s.markWhole(k)
		}
		if err == nil {
			if learn {
				s.lat.add(s.now().Sub(start))
			}
			s.succeeded(ps[i].ID)
		}
		return body{rc, total}, err
	}
	var errs []error
	allNotFound := true
	var busy *BusyError
	var waiting []peer.AddrInfo // holders that sent us to wait for others
	failed := func(i int, err error) error {
		p := ps[i]
		if errors.Is(err, ErrRangeNotSatisfiable) {
			// The asker's range is past the end: no provider can serve it
			// and this one is not at fault.
			return fmt.Errorf("%s range %d+%d: %w", k, off, n, err)
		}
		if ctx.Err() == nil {
			s.log.Debug("peer fetch failed; trying the next provider", "key", k, "peer", p.ID.String(), "off", off, "err", err)
		}
		errs = append(errs, fmt.Errorf("peer %s: %w", p.ID, err))
		var be *BusyError
		if errors.As(err, &be) {
			// Busy is no failure: no avoidance; the others are asked.
			if be.waitsForOthers() {
				waiting = append(waiting, p)
			}
			busy = worseBusy(busy, be)
			return nil
		}
		if !errors.Is(err, blob.ErrNotFound) {
			allNotFound = false
			if ctx.Err() == nil {
				s.penalize(p.ID, err)
			}
		}
		return nil
	}
	// A holder that sent us to wait for other askers, while the only tries
	// left are slow to answer (a crawling link): end the round as busy, so
	// the wait, and at its end an insisting request, goes on at the holder
	// rather than on the slow provider.
	h.stuck = func() error {
		if busy != nil && busy.waitsForOthers() {
			b := *busy
			b.holders = waiting
			return &b
		}
		return nil
	}
	win, asked, err := h.run(ctx, len(ps), get, failed)
	switch {
	case err == nil:
		return &attempt{p: ps[win.idx], rc: win.v.rc, total: win.v.total, cancel: win.cancel, held: waiting}, slices.Clone(ps[asked:]), nil
	case !errors.Is(err, errTriesFailed):
		return nil, nil, err
	}
	err = errors.Join(errs...)
	if busy != nil {
		// A holder that is busy still holds the blob: the providers that
		// failed are avoided from now on, and the fetch waits its turn at
		// the busy one rather than sending the chunk to the origin.
		b := *busy
		b.holders = waiting
		return nil, nil, &b
	}
	if allNotFound {
		return nil, nil, fmt.Errorf("%s range %d+%d: %w (no provider holds it: %v)", k, off, n, blob.ErrNotFound, err)
	}
	// %v, not %w: a "don't have" among real failures must not make the
	// whole answer look like a clean ErrNotFound.
	return nil, nil, fmt.Errorf("%s range %d+%d from peers: %v", k, off, n, err)
}
