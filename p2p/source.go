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
	again := func() []peer.AddrInfo { return s.spread(k, off, s.order(s.providers(ctx, k))) }
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
			ps = addMissing(again(), held)
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

// fanoutWait bounds how long a fetch waits for other askers of a blob (a
// holder's fan-out answer) before it insists: the askers served first may
// be slow or gone, and a rollout's tree needs only a blob's transfer and
// check per hop. A wait for the zone's copy may take the whole busy wait.
const fanoutWait = 4 * time.Second

// zoneHold is how long a "zone" busy answer for a blob keeps this node
// asking only the holders of its own zone (each such answer renews it).
const zoneHold = 2 * time.Second

// markCrossing notes that another asker of this node's zone is being served
// k across zones (a holder's "zone" busy answer).
func (s *Source) markCrossing(k blob.Key) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	s.crossing = s.crossing.set(k, now.Add(zoneHold), now)
}

// deadlines maps blobs to the time a mark on them ends, bounded to
// maxFanoutBlobs: at the bound, marks that ended are dropped first.
type deadlines map[blob.Key]time.Time

// set marks k until then and returns the map (made on first use).
func (d deadlines) set(k blob.Key, until, now time.Time) deadlines {
	if d == nil {
		d = deadlines{}
	}
	if len(d) >= maxFanoutBlobs {
		for key, u := range d {
			if now.After(u) {
				delete(d, key)
			}
		}
	}
	d[k] = until
	return d
}

// live reports whether k's mark has not ended at now.
func (d deadlines) live(k blob.Key, now time.Time) bool {
	until, ok := d[k]
	return ok && now.Before(until)
}

// wholeBody is a peer's answer that can say it came from a whole,
// verified copy (wholeHeader).
type wholeBody interface{ fromWhole() bool }

// wholeHold is how long knowing of a whole copy of a blob among its
// providers lasts after the last sign of one.
const wholeHold = time.Minute

// markWhole notes that a provider holds k whole and verified: a swarm pull
// of k then needs no chunk owners (FetchShared, Owns): every chunk can come
// from a holder, and the holders' fan-out spreads the copies.
func (s *Source) markWhole(k blob.Key) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if until, ok := s.whole[k]; ok && until.Sub(now) > wholeHold/2 {
		return // fresh enough: most answers change nothing
	}
	s.whole = s.whole.set(k, now.Add(wholeHold), now)
}

// knowsWhole reports whether a provider lately said it holds k whole.
func (s *Source) knowsWhole(k blob.Key) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.whole.live(k, s.now())
}

// zoneGate keeps only the holders in this node's zone when the blob should
// reach the zone once and spread inside it: while another asker of the zone
// is crossing for k (markCrossing), and, once a provider is known to hold k
// whole (markWhole), whenever this node is not the zone's crosser for k,
// the first by rendezvous of itself and the providers known in its zone.
// Every node of the zone that sees the same providers picks the same
// crosser, which serves them once it verified the blob. gated reports that
// the list was cut.
func (s *Source) zoneGate(k blob.Key, ps []peer.AddrInfo) ([]peer.AddrInfo, bool) {
	same, _, ok := s.zoneSplit(ps)
	if !ok || len(same) == len(ps) {
		return ps, false // no zones, or nothing to cut
	}
	s.mu.Lock()
	crossing := s.crossing.live(k, s.now())
	s.mu.Unlock()
	if crossing {
		return same, true
	}
	if len(same) > 0 && s.knowsWhole(k) && !s.crossesFor(k, same) {
		return same, true
	}
	return ps, false
}

// zoneSplit sorts providers by this node's zone: same are those known to be
// in it, other reports whether any is known to be in another; ok is false
// when this node has no zone.
func (s *Source) zoneSplit(ps []peer.AddrInfo) (same []peer.AddrInfo, other, ok bool) {
	if s.zones == nil {
		return nil, false, false
	}
	mine := s.zones.mine()
	if mine == "" {
		return nil, false, false
	}
	for _, p := range ps {
		switch z := s.zones.of(p.ID); {
		case z == mine:
			same = append(same, p)
		case z != "":
			other = true
		}
	}
	return same, other, true
}

// crossesFor reports whether this node is its zone's crosser for k: the
// first by rendezvous of itself and same, the providers known in its zone.
func (s *Source) crossesFor(k blob.Key, same []peer.AddrInfo) bool {
	ids := make([]peer.ID, 0, len(same)+1)
	ids = append(ids, s.self)
	for _, p := range same {
		ids = append(ids, p.ID)
	}
	return rank(k, 0, ids)[0] == s.self
}

// zoneProbeWait bounds how long a fetch waits for the first fetch of the
// same blob to hear whether a whole copy exists (zoneProbe).
const zoneProbeWait = 500 * time.Millisecond

// zoneProbe: with zones, before this node knows whether a whole copy of k
// exists, its first fetch of k goes alone and the others (its read-ahead)
// wait for that fetch's first answer (at most zoneProbeWait): a whole
// copy's answer gates them to the zone (zoneGate), so a blob's read-ahead
// does not cross zones before the zone agreed on one crosser. It returns
// the channel to wait on, or, for the fetch that goes first, the function
// that ends the probe (endZoneProbe does the same by key); both nil when
// there is nothing to probe (no zones, no holder in another zone or none in
// this one, a whole copy already known).
func (s *Source) zoneProbe(k blob.Key, ps []peer.AddrInfo) (<-chan struct{}, func()) {
	if s.knowsWhole(k) {
		return nil, nil
	}
	if same, other, ok := s.zoneSplit(ps); !ok || len(same) == 0 || !other {
		return nil, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if ch, ok := s.probes[k]; ok {
		return ch, nil
	}
	if s.probes == nil {
		s.probes = map[blob.Key]chan struct{}{}
	}
	s.probes[k] = make(chan struct{})
	return nil, func() { s.endZoneProbe(k) }
}

// endZoneProbe ends k's probe, if any: its fetch has its first answer.
func (s *Source) endZoneProbe(k blob.Key) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ch, ok := s.probes[k]; ok {
		close(ch)
		delete(s.probes, k)
	}
}

// zoneCrosser reports whether this node is its zone's crosser for k (see
// zoneGate) among providers ps: it then insists, so that a holder in
// another zone whose turn for the zone went to a node that crossed before
// the zone agreed serves it all the same, and the others wait for it.
func (s *Source) zoneCrosser(k blob.Key, ps []peer.AddrInfo) bool {
	if !s.knowsWhole(k) {
		return false
	}
	same, other, ok := s.zoneSplit(ps)
	return ok && other && len(same) > 0 && s.crossesFor(k, same)
}

// worseBusy is the busy answer that decides the asker's wait: "zone" over
// "fanout" over a loaded holder (a holder that waits for others means a copy
// is coming), then the shorter wait among those, the longer among loaded ones.
func worseBusy(a, b *BusyError) *BusyError {
	if a == nil {
		return b
	}
	rank := func(e *BusyError) int {
		switch e.Reason {
		case "zone":
			return 2
		case "fanout":
			return 1
		}
		return 0
	}
	switch ra, rb := rank(a), rank(b); {
	case ra != rb:
		if rb > ra {
			return b
		}
		return a
	case ra > 0:
		if b.RetryAfter < a.RetryAfter {
			return b
		}
		return a
	case b.RetryAfter > a.RetryAfter:
		return b
	}
	return a
}

// spread orders the providers of the chunk at off by their rendezvous
// score: every node ranks the same holders the same way for a chunk, and
// different chunks start at different holders, so a blob many nodes read
// is served by all of its holders instead of the first the DHT returned.
func (s *Source) spread(k blob.Key, off int64, ps []peer.AddrInfo) []peer.AddrInfo {
	if !s.noSpread {
		ps = spread(k, off, ps)
	}
	if s.zones != nil && s.zones.mine() != "" {
		if s.learnZones != nil {
			s.learnZones(ps)
		}
		ps = s.zones.sameZoneFirst(ps)
	}
	return ps
}

func spread(k blob.Key, off int64, ps []peer.AddrInfo) []peer.AddrInfo {
	if len(ps) < 2 {
		return ps
	}
	ids := make([]peer.ID, len(ps))
	byID := make(map[peer.ID]peer.AddrInfo, len(ps))
	for i, p := range ps {
		ids[i], byID[p.ID] = p.ID, p
	}
	out := make([]peer.AddrInfo, 0, len(ps))
	for _, id := range rank(k, off, ids) {
		out = append(out, byID[id])
	}
	return out
}

// hedgedOnce asks every provider once (hedgedOpt). When no provider served
// and at least one was busy, the error is the busy answer worseBusy keeps.
func (s *Source) hedgedOnce(ctx context.Context, ps []peer.AddrInfo, k blob.Key, off, n int64, learn bool) (*attempt, []peer.AddrInfo, error) {
	type body struct {
		rc    io.ReadCloser
		total int64
	}
	h := hedge[body]{
		delay:  s.lat.hedgeDelay,
		hedged: s.m.hedges.Inc,
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
	if allNotFound && busy != nil {
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
