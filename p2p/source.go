package p2p

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"strings"
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

const (
	// Provider lists are reused for a while so a blob costs one lookup, not
	// one per chunk; an empty answer is remembered too, shorter, so a blob
	// nobody has goes upstream at once and peers that start holding it are
	// noticed soon.
	positiveTTL = 30 * time.Second
	negativeTTL = 5 * time.Second
	// A lookup that ran out of time is followed by one bounded by
	// lateFactor × --resolve-timeout, at least lateMin (see lookLaterLocked).
	lateFactor = 10
	lateMin    = 500 * time.Millisecond
	// A peer that failed is not asked for a while (doubling while it keeps
	// failing); one whose bytes failed verification, for longer.
	errorAvoid    = 5 * time.Second
	maxErrorAvoid = 2 * time.Minute
	blameAvoid    = 10 * time.Minute
	// A body that makes no progress this long is abandoned for the next provider.
	stallTimeout = 5 * time.Second
	// Hedge delay bounds; in between it follows the observed first-byte times.
	minHedge, maxHedge, initialHedge = 5 * time.Millisecond, 500 * time.Millisecond, 50 * time.Millisecond
	maxCachedKeys                    = 8192
	// After its first provider a lookup keeps collecting for providerGrace.
	// One whose caller waits for that first provider stops sooner, at the
	// first pause of providerGap (one answer carries every provider its peer
	// knows): waiting for later answers costs the DHT query's work on this
	// node (up to its concurrency of requests in flight) while the caller is
	// already reading from the first provider. See dhtFinder.
	providerGrace = 2 * time.Millisecond
	providerGap   = 200 * time.Microsecond
	// defaultMissHedge is how long a swarm pull's first chunk waits for the
	// first lookup before it starts from the origin anyway (firstSwarmLookup;
	// SetMissHedge).
	defaultMissHedge = 10 * time.Millisecond
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
}

type provEntry struct {
	done       chan struct{} // closed when the first lookup answered
	gathering  chan struct{} // a swarm pull's second lookup (see firstSwarmLookup); closed when it answered
	peers      []peer.AddrInfo
	expires    time.Time
	at         time.Time // when the answer was looked up
	refreshing bool
}

type avoidEntry struct {
	until  time.Time
	blamed bool
	fails  int
	reason string
}

func newSource(self peer.ID, f providerFinder, g rangeGetter, m *metrics, log *slog.Logger, timeout time.Duration, retries int) *Source {
	if m == nil {
		m = newMetrics(nil)
	}
	if log == nil {
		log = slog.Default()
	}
	return &Source{self: self, finder: f, getter: g, m: m, log: log, timeout: timeout, retries: retries,
		gather: swarmGather, hedge: defaultMissHedge, now: time.Now, after: time.After, bg: context.Background(), swarmChunks: newSwarmChunks(), provs: map[blob.Key]*provEntry{}, avoid: map[peer.ID]avoidEntry{}}
}

// Name labels the source in metrics and logs.
func (s *Source) Name() string { return "peer" }

// providers returns the peers advertising k: from the cache, or from one
// lookup shared by every concurrent caller. An expired answer is still used
// while a background lookup refreshes it, so only a blob's first chunk ever
// waits for the DHT, and that wait ends with the first provider found (the
// lookup goes on collecting the others for failover in the background).
func (s *Source) providers(ctx context.Context, k blob.Key) []peer.AddrInfo {
	return s.providersWithin(ctx, k, 0)
}

// Providers returns the peers known to advertise k, as Fetch finds them:
// the cached answer, or a lookup that returns at its first provider.
func (s *Source) Providers(ctx context.Context, k blob.Key) []peer.AddrInfo {
	return s.providers(ctx, k)
}

// providersWithin is providers with a shorter freshness bound (0: the usual
// TTLs). Swarm pulls use swarmRefresh: the set of nodes pulling a blob
// changes by the second during a burst. A swarm pull's first lookup runs to
// its end (owners are computed over the whole list); when it finds nobody,
// its caller gets the empty list at once (the chunk it waits for comes from
// the origin now) while everyone else waits for a second lookup made
// s.gather after the first (see swarmGather).
func (s *Source) providersWithin(ctx context.Context, k blob.Key, maxAge time.Duration) []peer.AddrInfo {
	ps, _ := s.swarmProviders(ctx, k, maxAge)
	return ps
}

// swarmProviders is providersWithin that also returns, to the caller whose
// first swarm lookup found nobody, the channel closed when the second lookup
// answered (nil otherwise).
func (s *Source) swarmProviders(ctx context.Context, k blob.Key, maxAge time.Duration) ([]peer.AddrInfo, <-chan struct{}) {
	s.mu.Lock()
	e := s.provs[k]
	if e == nil {
		e = &provEntry{done: make(chan struct{})}
		if len(s.provs) >= maxCachedKeys {
			s.pruneLocked()
		}
		s.provs[k] = e
		s.mu.Unlock()
		s.m.lookupCache.WithLabelValues("miss").Inc()
		if maxAge > 0 {
			return s.firstSwarmLookup(ctx, k, e)
		}
		return s.firstLookup(ctx, k, e), nil
	}
	s.mu.Unlock()
	// Another caller's first lookup may still be running: share it.
	select {
	case <-e.done:
	case <-ctx.Done():
		return nil, nil
	}
	if maxAge > 0 {
		s.mu.Lock()
		g := e.gathering
		s.mu.Unlock()
		if g != nil {
			select {
			case <-g:
			case <-ctx.Done():
				return nil, nil
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	peers := e.peers
	fresh := s.now().Before(e.expires) && (maxAge <= 0 || s.now().Sub(e.at) < maxAge)
	switch {
	case fresh:
		s.m.lookupCache.WithLabelValues(hitLabel(peers)).Inc()
	case !e.refreshing:
		e.refreshing = true
		s.m.lookupCache.WithLabelValues("stale").Inc()
		go s.refresh(k, e, s.timeout)
	default:
		s.m.lookupCache.WithLabelValues("stale").Inc()
	}
	return peers, nil
}

// firstLookup makes k's first lookup and returns as soon as it found one
// provider (or ended). The lookup itself runs under the node's lifetime,
// not the caller's: a caller that gives up must neither cut the list short
// for the others nor make "nobody has it" stick.
func (s *Source) firstLookup(ctx context.Context, k blob.Key, e *provEntry) []peer.AddrInfo {
	go func() {
		found, late := s.lookup(s.bg, k, s.timeout, func(first []peer.AddrInfo) {
			s.mu.Lock()
			s.setLocked(e, first)
			close(e.done)
			s.mu.Unlock()
		})
		s.mu.Lock()
		defer s.mu.Unlock()
		select {
		case <-e.done:
			if len(found) == 0 {
				return // the node is closing: keep what the first answer said
			}
		default:
			defer close(e.done)
		}
		s.setLocked(e, found)
		s.lookLaterLocked(k, e, late)
	}()
	return s.peersWhen(ctx, e.done, e)
}

// peersWhen returns e's providers once ch is closed, or nil when ctx ends
// first.
func (s *Source) peersWhen(ctx context.Context, ch <-chan struct{}, e *provEntry) []peer.AddrInfo {
	select {
	case <-ch:
	case <-ctx.Done():
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return e.peers
}

// firstSwarmLookup is the first lookup of a blob this node starts pulling
// with an origin behind the peers. Nodes that start a burst together
// announce within milliseconds of each other, so a lookup now sees those
// that started earlier but rarely those starting at the same moment; the
// pull's chunks are split only over the answer of a second lookup s.gather
// later, which sees everyone who started with us. Split over the first
// answer, each node would own, and fetch from the origin, a share of its
// first read-ahead window computed over too few nodes (all of it when the
// answer is empty).
//
// When the first answer is empty (nobody else pulls the blob, or this node
// is the first of a burst), its caller alone gets it at once together with
// the window's channel: the chunk its reader waits for is fetched from the
// origin now, so a cold miss costs no added latency, and is left to its
// owner if the second answer shows one (FetchBacked's blob.NotYet, the
// cache's speculate). When nodes are already pulling, the caller waits for
// the window like every other chunk: they are fetching the blob already.
//
// A lookup still running after s.hedge counts as empty for its caller (a
// slow DHT, or a large one answering "nobody" late, must not hold a cold
// miss's first byte): the chunk starts from the origin, and the lookup's
// answer and the second one decide as above whether it is kept.
func (s *Source) firstSwarmLookup(ctx context.Context, k blob.Key, e *provEntry) ([]peer.AddrInfo, <-chan struct{}) {
	start := s.now()
	var g chan struct{}
	if s.gather > 0 {
		g = make(chan struct{})
		s.mu.Lock()
		e.gathering = g
		s.mu.Unlock()
	}
	// The lookup runs under the node's lifetime: a caller that gives up or
	// goes ahead must neither cut it short nor make "nobody" stick.
	result := make(chan []peer.AddrInfo, 1)
	go func() {
		found, late := s.lookup(s.bg, k, s.timeout, nil)
		s.mu.Lock()
		s.setLocked(e, found)
		s.lookLaterLocked(k, e, late)
		close(e.done)
		s.mu.Unlock()
		if g != nil {
			go s.gatherLookup(k, e, start.Add(s.gather))
		}
		result <- found
	}()
	var hedge <-chan time.Time
	if g != nil {
		t := time.NewTimer(s.hedge)
		defer t.Stop()
		hedge = t.C
	}
	select {
	case found := <-result:
		if g == nil || len(found) == 0 {
			return found, g
		}
	case <-hedge:
		s.m.lookupCache.WithLabelValues("hedged").Inc()
		return nil, g
	case <-ctx.Done():
		return nil, nil
	}
	return s.peersWhen(ctx, g, e), nil
}

// gatherLookup looks k up again at the end of its gather window.
func (s *Source) gatherLookup(k blob.Key, e *provEntry, at time.Time) {
	select {
	case <-s.after(at.Sub(s.now())):
	case <-s.bg.Done():
	}
	var found []peer.AddrInfo
	if s.bg.Err() == nil {
		found, _ = s.lookup(s.bg, k, s.timeout, nil)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.bg.Err() == nil {
		// The second look adds the nodes that started with this one; it
		// must not drop those the first one found. An answer can be partial
		// (a lookup stops 2 ms after its first provider, and this node's own
		// records of the nodes pulling with it come first), and a holder
		// missing from the list would make this node fetch the chunks it
		// then "owns" from the origin.
		s.setLocked(e, unionPeers(e.peers, found))
	}
	close(e.gathering)
}

// unionPeers returns a followed by the peers of b that a lacks.
func unionPeers(a, b []peer.AddrInfo) []peer.AddrInfo {
	out := slices.Clone(a)
	for _, p := range b {
		if !slices.ContainsFunc(out, func(q peer.AddrInfo) bool { return q.ID == p.ID }) {
			out = append(out, p)
		}
	}
	return out
}

func hitLabel(peers []peer.AddrInfo) string {
	if len(peers) > 0 {
		return "hit"
	}
	return "negative_hit"
}

func (s *Source) setLocked(e *provEntry, found []peer.AddrInfo) {
	e.peers = found
	e.at = s.now()
	if len(found) > 0 {
		e.expires = s.now().Add(positiveTTL)
	} else {
		e.expires = s.now().Add(negativeTTL)
	}
}

// refresh looks k up again in the background, each try bounded by timeout;
// it stops when the node closes.
func (s *Source) refresh(k blob.Key, e *provEntry, timeout time.Duration) {
	found, _ := s.lookup(s.bg, k, timeout, nil)
	s.mu.Lock()
	defer s.mu.Unlock()
	e.refreshing = false
	if s.bg.Err() != nil {
		return
	}
	s.setLocked(e, found)
}

// lookup asks the DHT, with --resolve-retries more tries when nobody answers,
// each try bounded by timeout. early, when not nil, is called once with the
// first providers found while the query goes on collecting more. late
// reports that nobody was found because every try ran out of time (not
// because the query ended).
func (s *Source) lookup(ctx context.Context, k blob.Key, timeout time.Duration, early func([]peer.AddrInfo)) (found []peer.AddrInfo, late bool) {
	others := func(ps []peer.AddrInfo) []peer.AddrInfo {
		var out []peer.AddrInfo
		for _, p := range ps {
			if p.ID != s.self && !slices.ContainsFunc(out, func(q peer.AddrInfo) bool { return q.ID == p.ID }) {
				out = append(out, p)
			}
		}
		return out
	}
	var first func([]peer.AddrInfo)
	if early != nil {
		first = func(ps []peer.AddrInfo) {
			if own := others(ps); len(own) > 0 && early != nil {
				early(own)
				early = nil
			}
		}
	}
	for attempt := 0; attempt <= s.retries && len(found) == 0 && ctx.Err() == nil; attempt++ {
		start := s.now()
		lctx, cancel := context.WithTimeout(ctx, timeout)
		ps, err := s.finder.FindProviders(lctx, k, first)
		// A query that ran to completion and found nobody is an answer, not a
		// failure: only a deadline or an error is worth another try.
		late = errors.Is(lctx.Err(), context.DeadlineExceeded)
		retry := err != nil || late
		cancel()
		found = others(append(found, ps...))
		result := "found"
		if len(found) == 0 {
			result = "not_found"
		}
		s.m.lookupSeconds.WithLabelValues(result).Observe(s.now().Sub(start).Seconds())
		if err != nil {
			s.log.Debug("provider lookup failed", "key", k, "err", err)
		}
		if !retry {
			break
		}
	}
	if first != nil {
		first(found) // a finder that never reported early
	}
	return found, late && len(found) == 0
}

// lookLaterLocked follows a lookup that found nobody only because it ran
// out of time (late) with one more, in the background and with a longer
// bound (lateTimeout): on a slow network (a large DHT, busy nodes) the
// reader who waited has gone to the origin, but the blob's next chunks and
// readers should find the peers instead of the negative answer for
// negativeTTL. Its answer replaces the entry's when it finds someone.
func (s *Source) lookLaterLocked(k blob.Key, e *provEntry, late bool) {
	if !late || e.refreshing || s.bg.Err() != nil {
		return
	}
	e.refreshing = true
	s.m.lookupCache.WithLabelValues("late").Inc()
	go s.refresh(k, e, max(lateFactor*s.timeout, lateMin))
}

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

func (s *Source) pruneLocked() {
	now := s.now()
	for k, e := range s.provs {
		select {
		case <-e.done:
			if now.After(e.expires) {
				delete(s.provs, k)
			}
		default:
		}
	}
	for len(s.provs) >= maxCachedKeys { // still full: drop arbitrary finished entries
		for k, e := range s.provs {
			select {
			case <-e.done:
				delete(s.provs, k)
			default:
			}
			break
		}
	}
}

// forgetProviders drops k's cached provider list.
func (s *Source) forgetProviders(k blob.Key) {
	s.mu.Lock()
	if e := s.provs[k]; e != nil {
		select {
		case <-e.done:
			delete(s.provs, k)
		default:
		}
	}
	s.mu.Unlock()
}

// order keeps the DHT's order but leaves out peers that failed recently or
// served bytes that failed verification: a dead provider must not cost every
// chunk a dial timeout before the origin is tried.
func (s *Source) order(ps []peer.AddrInfo) []peer.AddrInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	out := make([]peer.AddrInfo, 0, len(ps))
	for _, p := range ps {
		if a, ok := s.avoid[p.ID]; ok && now.Before(a.until) {
			continue
		}
		out = append(out, p)
	}
	return out
}

// penalize avoids a failing peer, longer after each consecutive failure.
func (s *Source) penalize(p peer.ID, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.avoid[p]
	if a.blamed && s.now().Before(a.until) {
		return
	}
	a.fails++
	a.until = s.now().Add(min(errorAvoid<<min(a.fails-1, 8), maxErrorAvoid))
	a.reason = err.Error()
	s.avoid[p] = a
}

// succeeded forgets a peer's past failures (not a blame).
func (s *Source) succeeded(p peer.ID) {
	s.mu.Lock()
	if a, ok := s.avoid[p]; ok && !a.blamed {
		delete(s.avoid, p)
	}
	s.mu.Unlock()
}

// Blame avoids the peers whose bytes of k failed verification (blob.Blamer).
// origin is what the reader's Origin returned: peer IDs joined by commas.
func (s *Source) Blame(k blob.Key, origin string) {
	s.forgetProviders(k)
	for _, o := range strings.Split(origin, ",") {
		p, err := peer.Decode(o)
		if err != nil {
			continue
		}
		s.mu.Lock()
		s.avoid[p] = avoidEntry{until: s.now().Add(blameAvoid), blamed: true, reason: "bytes failed verification"}
		s.mu.Unlock()
		s.m.blames.Inc()
		s.log.Warn("peer served bytes that failed verification; avoiding it", "peer", o, "key", k, "for", blameAvoid)
	}
}

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
	res, rest, err := s.hedged(ctx, ps, k, off, n)
	if err != nil {
		return nil, -1, err
	}
	want := n
	if n < 0 || n > res.total-off {
		want = res.total - off
	}
	return &peerReader{s: s, ctx: ctx, k: k, off: off, want: want, total: res.total,
		cur: res, rest: rest, origins: []string{res.p.ID.String()}}, res.total, nil
}

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

// peerReader delivers one range, resuming from the next provider at the byte
// it stopped when a transfer breaks or stalls.
type peerReader struct {
	s                *Source
	ctx              context.Context
	k                blob.Key
	off, want, total int64
	pos              int64
	cur              *attempt
	rest             []peer.AddrInfo
	origins          []string
	closed           bool
}

// Origin names the peers the bytes came from (blob.Attributed).
func (r *peerReader) Origin() string { return strings.Join(r.origins, ",") }

func (r *peerReader) Read(p []byte) (int, error) {
	for {
		if r.pos >= r.want {
			return 0, io.EOF
		}
		if r.cur == nil {
			return 0, errors.New("peer reader closed")
		}
		if int64(len(p)) > r.want-r.pos {
			p = p[:r.want-r.pos]
		}
		stall := time.AfterFunc(stallTimeout, r.cur.cancel)
		m, err := r.cur.rc.Read(p)
		stalled := !stall.Stop()
		r.pos += int64(m)
		if err == io.EOF && r.pos >= r.want {
			return m, io.EOF
		}
		if err == nil {
			return m, nil
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		if stalled {
			err = fmt.Errorf("no progress for %v: %w", stallTimeout, err)
			r.s.m.peerErrors.WithLabelValues("timeout").Inc()
		} else {
			r.s.m.peerErrors.WithLabelValues("read").Inc()
		}
		if rerr := r.resume(err); rerr != nil {
			return m, rerr
		}
		if m > 0 {
			return m, nil
		}
	}
}

// resume switches to the next provider for the bytes not yet delivered.
func (r *peerReader) resume(cause error) error {
	failed := r.cur
	failed.rc.Close()
	failed.cancel()
	r.cur = nil
	if r.ctx.Err() != nil {
		return r.ctx.Err()
	}
	r.s.penalize(failed.p.ID, cause)
	r.s.log.Info("peer transfer broke; resuming from the next provider", "key", r.k, "peer", failed.p.ID.String(),
		"at", r.off+r.pos, "err", cause)
	errs := []error{fmt.Errorf("peer %s: %w", failed.p.ID, cause)}
	for len(r.rest) > 0 {
		p := r.rest[0]
		r.rest = r.rest[1:]
		actx, cancel := context.WithCancel(r.ctx)
		rc, total, err := r.s.getter.GetRange(actx, p, r.k, r.off+r.pos, r.want-r.pos)
		if err == nil && total != r.total {
			rc.Close()
			err = fmt.Errorf("size %d, expected %d", total, r.total)
			r.s.m.peerErrors.WithLabelValues("size").Inc()
		}
		if err != nil {
			cancel()
			errs = append(errs, fmt.Errorf("peer %s: %w", p.ID, err))
			if !errors.Is(err, blob.ErrNotFound) && r.ctx.Err() == nil {
				r.s.penalize(p.ID, err)
			}
			continue
		}
		r.s.m.resumes.Inc()
		r.cur = &attempt{p: p, rc: rc, total: total, cancel: cancel}
		if !slices.Contains(r.origins, p.ID.String()) {
			r.origins = append(r.origins, p.ID.String())
		}
		return nil
	}
	return fmt.Errorf("%s at byte %d: %w", r.k, r.off+r.pos, errors.Join(errs...))
}

func (r *peerReader) Close() error {
	if r.closed {
		return nil
	}
	r.closed = true
	if r.cur != nil {
		r.cur.rc.Close()
		r.cur.cancel()
		r.cur = nil
	}
	return nil
}

// latencies keeps recent first-byte times to set the hedge delay: about
// twice the 90th percentile, so only a clearly slow provider is hedged.
type latencies struct {
	mu  sync.Mutex
	buf [128]time.Duration
	n   int
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.buf[l.n%len(l.buf)] = d
	l.n++
	l.mu.Unlock()
}

func (l *latencies) hedgeDelay() time.Duration {
	l.mu.Lock()
	cnt := min(l.n, len(l.buf))
	if cnt < 8 {
		l.mu.Unlock()
		return initialHedge
	}
	s := make([]time.Duration, cnt)
	copy(s, l.buf[:cnt])
	l.mu.Unlock()
	slices.Sort(s)
	d := 2 * s[cnt*9/10]
	return min(max(d, minHedge), maxHedge)
}

// dhtFinder finds providers on the node's DHT.
type dhtFinder struct{ n *Node }

func (f *dhtFinder) FindProviders(ctx context.Context, k blob.Key, first func([]peer.AddrInfo)) ([]peer.AddrInfo, error) {
	c, err := KeyToCID(k)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // stops the DHT query when we return early
	// A caller waiting for the first provider (first != nil) goes on with it
	// and the rest are for failover: stop at the first pause. Swarm and
	// background lookups split chunks over the whole list: collect for the
	// whole grace.
	gap := providerGrace
	if first != nil {
		gap = providerGap
	}
	return collectProviders(ctx, f.n.dht.FindProvidersAsync(ctx, c, 16), first, providerGrace, gap), nil
}

// collectProviders reads a lookup's providers from ch until it closes, ctx
// ends, no provider came for gap since the last one, or grace passed since
// the first. first, when not nil, is called with the first provider.
func collectProviders(ctx context.Context, ch <-chan peer.AddrInfo, first func([]peer.AddrInfo), grace, gap time.Duration) []peer.AddrInfo {
	var out []peer.AddrInfo
	var graceC, gapC <-chan time.Time
	var gapT *time.Timer
	for {
		select {
		case ai, ok := <-ch:
			if !ok {
				return out
			}
			out = append(out, ai)
			if gapT == nil {
				if first != nil {
					first(out)
					// Let the caller that first woke run now: otherwise it
					// waits behind the hand-offs of the rest of this answer
					// (each provider readies the DHT goroutine sending the
					// next, which takes the woken caller's turn).
					runtime.Gosched()
				}
				t := time.NewTimer(grace)
				defer t.Stop()
				graceC = t.C
				gapT = time.NewTimer(gap)
				defer gapT.Stop()
				gapC = gapT.C
			} else {
				resetTimer(gapT, gap)
			}
		case <-gapC:
			return out
		case <-graceC:
			return out
		case <-ctx.Done():
			return out
		}
	}
}
