package p2p

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
)

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
	// maxCachedKeys bounds how many blobs the provider cache holds.
	maxCachedKeys = 8192
	// defaultMissHedge is how long a swarm pull's first chunk waits for the
	// first lookup before it starts from the origin anyway (firstSwarmLookup;
	// SetMissHedge).
	defaultMissHedge = 10 * time.Millisecond
)

type provEntry struct {
	done       chan struct{} // closed when the first lookup answered
	gathering  chan struct{} // a swarm pull's second lookup (see firstSwarmLookup); closed when it answered
	gatherWait int           // callers waiting for gathering now (see gatherLookup)
	peers      []peer.AddrInfo
	expires    time.Time
	at         time.Time // when the answer was looked up
	refreshing bool
}

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
// first swarm lookup found nobody, its speculation (nil otherwise).
func (s *Source) swarmProviders(ctx context.Context, k blob.Key, maxAge time.Duration) ([]peer.AddrInfo, *speculation) {
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
		if g != nil && !s.awaitGather(ctx, e, g) {
			return nil, nil
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
		found, rest := s.lookup(s.bg, k, s.timeout, func(first []peer.AddrInfo) {
			s.mu.Lock()
			s.setLocked(e, first)
			close(e.done)
			s.mu.Unlock()
		})
		s.mu.Lock()
		defer s.mu.Unlock()
		select {
		case <-e.done:
			// The first provider answered already: keep its list unless
			// the query's end has more.
			if len(found) > 0 {
				s.setLocked(e, found)
			}
		default:
			defer close(e.done)
			s.setLocked(e, found)
		}
		s.lookLaterLocked(k, e, rest, false)
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
// owner if the second answer shows one (FetchShared's Gathering, the
// cache's speculate). When nodes are already pulling, the caller waits for
// the window like every other chunk: they are fetching the blob already.
//
// A lookup still running after s.hedge counts as empty for its caller (a
// slow DHT, or a large one answering "nobody" late, must not hold a cold
// miss's first byte): the chunk starts from the origin, and the lookup's
// answer and the second one decide as above whether it is kept.
func (s *Source) firstSwarmLookup(ctx context.Context, k blob.Key, e *provEntry) ([]peer.AddrInfo, *speculation) {
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
		found, rest := s.lookup(s.bg, k, s.timeout, nil)
		s.mu.Lock()
		s.setLocked(e, found)
		s.lookLaterLocked(k, e, rest, false)
		close(e.done)
		s.mu.Unlock()
		if g != nil {
			go s.gatherLookup(k, e, start.Add(s.gather))
		}
		result <- found
	}()
	var hedge <-chan time.Time
	if g != nil {
		d := s.hedge
		if s.expectsHeld(k) {
			d = max(d, expectWait)
		}
		t := time.NewTimer(d)
		defer t.Stop()
		hedge = t.C
	}
	select {
	case found := <-result:
		if g == nil {
			return found, nil
		}
		if len(found) == 0 {
			return found, s.speculating(e, g)
		}
	case <-hedge:
		s.m.lookupCache.WithLabelValues("hedged").Inc()
		return nil, s.speculating(e, g)
	case <-ctx.Done():
		return nil, nil
	}
	if !s.awaitGather(ctx, e, g) {
		return nil, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return e.peers, nil
}

// awaitGather waits until e's gather window ended (g closed), counted
// among the window's waiters meanwhile; false when ctx ended first.
func (s *Source) awaitGather(ctx context.Context, e *provEntry, g <-chan struct{}) bool {
	defer s.speculating(e, g).release()
	select {
	case <-g:
		return true
	case <-ctx.Done():
		return false
	}
}

// A speculation is what the caller of a blob's first swarm lookup that
// found nobody holds: the gather window's channel, and release, which ends
// its count among the window's waiters (blob.Share.Release).
type speculation struct {
	gathering <-chan struct{}
	release   func()
}

// speculating counts a caller among e's gather window's waiters until it
// releases the returned speculation.
func (s *Source) speculating(e *provEntry, g <-chan struct{}) *speculation {
	s.mu.Lock()
	e.gatherWait++
	s.mu.Unlock()
	var once sync.Once
	return &speculation{gathering: g, release: func() {
		once.Do(func() {
			s.mu.Lock()
			e.gatherWait--
			s.mu.Unlock()
		})
	}}
}

// gatherLookup looks k up again at the end of its gather window, unless
// nobody waits for the window by then: its answer serves only the chunks
// that wait for it (a small blob that already arrived whole needs none), and
// a lookup is a walk of the DHT that costs every node on its way. Later
// readers find the list stale and refresh it like any other.
func (s *Source) gatherLookup(k blob.Key, e *provEntry, at time.Time) {
	select {
	case <-s.after(at.Sub(s.now())):
	case <-s.bg.Done():
	}
	s.mu.Lock()
	look := s.bg.Err() == nil && e.gatherWait > 0
	s.mu.Unlock()
	if !look {
		s.m.lookupCache.WithLabelValues("gather_skipped").Inc()
	}
	var found []peer.AddrInfo
	var rest <-chan []peer.AddrInfo
	if look {
		found, rest = s.lookup(s.bg, k, s.timeout, nil)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if look && s.bg.Err() == nil {
		// The second look adds the nodes that started with this one; it
		// must not drop those the first one found. An answer can be partial
		// (a lookup stops 2 ms after its first provider, and this node's own
		// records of the nodes pulling with it come first), and a holder
		// missing from the list would make this node fetch the chunks it
		// then "owns" from the origin.
		s.setLocked(e, unionPeers(e.peers, found))
		s.lookLaterLocked(k, e, rest, true)
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

// refresh looks k up again in the background. An answer that is empty only
// because the query is still running after timeout (a busy node or DHT) says
// nothing about the holders: the known list is kept until the query's own
// answer replaces it (lookLaterLocked), so a slow refresh never sends a
// blob's chunks to the origin for negativeTTL.
func (s *Source) refresh(k blob.Key, e *provEntry, timeout time.Duration) {
	found, rest := s.lookup(s.bg, k, timeout, nil)
	s.mu.Lock()
	defer s.mu.Unlock()
	e.refreshing = false
	if s.bg.Err() != nil {
		return
	}
	if rest != nil && len(e.peers) > 0 {
		s.m.lookupCache.WithLabelValues("kept").Inc()
		s.setLocked(e, e.peers)
	} else {
		s.setLocked(e, found)
	}
	s.lookLaterLocked(k, e, rest, false)
}

// lookupAnswer is what one DHT query found.
type lookupAnswer struct {
	found []peer.AddrInfo
	err   error
}

// lookup asks the DHT for k's providers and waits up to timeout for the
// answer. A query still running then goes on in the background, bounded by
// lateBound(timeout), and its answer comes on rest (nil when the query ended
// in time): starting a slow query over would make every node on its path
// answer the same walk again, on a network that is slow because it is busy.
// A query that failed (an error before it could answer, e.g. no peer to ask)
// is tried again, up to --resolve-retries times. early, when not nil, is
// called once with the first providers found while the query goes on
// collecting more, and never after lookup returned.
func (s *Source) lookup(ctx context.Context, k blob.Key, timeout time.Duration, early func([]peer.AddrInfo)) (found []peer.AddrInfo, rest <-chan []peer.AddrInfo) {
	var emu sync.Mutex
	first := func(ps []peer.AddrInfo) {
		emu.Lock()
		defer emu.Unlock()
		if own := s.others(ps); len(own) > 0 && early != nil {
			early(own)
			early = nil
		}
	}
	var onFirst func([]peer.AddrInfo)
	if early != nil {
		onFirst = first
	}
	for attempt := 0; attempt <= s.retries && ctx.Err() == nil; attempt++ {
		ch := s.query(ctx, k, lateBound(timeout), onFirst)
		t := time.NewTimer(timeout)
		select {
		case a := <-ch:
			t.Stop()
			found = s.others(append(found, a.found...))
			if a.err == nil || len(found) > 0 {
				first(found) // a finder that never reported early
				return found, nil
			}
		case <-t.C:
			emu.Lock()
			early = nil // the query's own answer comes on rest
			emu.Unlock()
			out := make(chan []peer.AddrInfo, 1)
			go func() { out <- s.others(append(found, (<-ch).found...)) }()
			return found, out
		}
	}
	first(found)
	return found, nil
}

// query runs one DHT query for k, bounded by bound, and sends its answer
// on the returned channel.
func (s *Source) query(ctx context.Context, k blob.Key, bound time.Duration, first func([]peer.AddrInfo)) <-chan lookupAnswer {
	ch := make(chan lookupAnswer, 1)
	go func() {
		start := s.now()
		qctx, cancel := context.WithTimeout(ctx, bound)
		defer cancel()
		ps, err := s.finder.FindProviders(qctx, k, first)
		ps = s.others(ps)
		result := "found"
		if len(ps) == 0 {
			result = "not_found"
		}
		s.m.lookupSeconds.WithLabelValues(result).Observe(s.now().Sub(start).Seconds())
		if err != nil {
			s.log.Debug("provider lookup failed", "key", k, "err", err)
		}
		ch <- lookupAnswer{found: ps, err: err}
	}()
	return ch
}

// others drops this node and duplicates from a provider list.
func (s *Source) others(ps []peer.AddrInfo) []peer.AddrInfo {
	var out []peer.AddrInfo
	for _, p := range ps {
		if p.ID != s.self && !slices.ContainsFunc(out, func(q peer.AddrInfo) bool { return q.ID == p.ID }) {
			out = append(out, p)
		}
	}
	return out
}

// lateBound is how long a query may run on after its caller stopped waiting.
func lateBound(timeout time.Duration) time.Duration {
	return max(lateFactor*timeout, lateMin)
}

// lookLaterLocked applies the answer of a query that outlasted its caller
// (rest, from lookup; nil: none) to k's entry when it arrives: on a slow
// network (a large DHT, busy nodes) the reader who waited has gone to the
// origin, but the blob's next chunks and readers should find the peers
// instead of the negative answer for negativeTTL. A non-empty answer
// replaces the entry's providers (merge: joins them); an empty one leaves
// known providers in place.
func (s *Source) lookLaterLocked(k blob.Key, e *provEntry, rest <-chan []peer.AddrInfo, merge bool) {
	if rest == nil || s.bg.Err() != nil {
		return
	}
	e.refreshing = true
	s.m.lookupCache.WithLabelValues("late").Inc()
	go func() {
		var found []peer.AddrInfo
		select {
		case found = <-rest:
		case <-s.bg.Done():
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		e.refreshing = false
		switch {
		case s.bg.Err() != nil:
		case len(found) > 0 && merge:
			s.setLocked(e, unionPeers(e.peers, found))
		case len(found) > 0 || len(e.peers) == 0:
			s.setLocked(e, found)
		}
	}()
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
