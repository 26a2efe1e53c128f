package p2p

// Whose turn it is to be served: the fan-out and zone answers a holder
// gives, the marks an asker keeps of them, and the per-chunk order of
// holders every node computes the same way.

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
)

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
// whole (markWhole), whenever this node is not the zone's crosser for k
// (isCrosser). gated reports that the list was cut.
func (s *Source) zoneGate(k blob.Key, ps []peer.AddrInfo) ([]peer.AddrInfo, bool) {
	same, other, ok := s.zoneSplit(ps)
	if !ok || !other {
		return ps, false // no zones, or nothing to cut
	}
	s.mu.Lock()
	crossing := s.crossing.live(k, s.now())
	s.mu.Unlock()
	if crossing {
		return same, true
	}
	if s.knowsWhole(k) && !s.isCrosser(k, ps, same) {
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

// crosserGrace is how long the nodes of a zone wait for their designated
// crosser of a blob to show up as a provider (it announces when its pull
// starts) before they fall back to choosing among the providers they see.
const crosserGrace = 3 * time.Second

// zoneRefresh bounds the age of the provider list a fetch waiting for its
// zone's copy asks again with.
const zoneRefresh = 250 * time.Millisecond

// isCrosser reports whether this node is its zone's crosser for k, the one
// node of the zone that reads k from another zone while the others wait
// for it. The designated crosser is the first by rendezvous of this node and
// every peer it knows in its zone: nodes that know the same zone members
// agree on it from the first chunk, whatever order their provider lists
// fill in. While the designated crosser is not among the providers ps (it
// may not pull k at all) the others wait crosserGrace for it; then the
// crosser is the first by rendezvous of this node and same, the providers
// known in its zone.
func (s *Source) isCrosser(k blob.Key, ps, same []peer.AddrInfo) bool {
	d := s.zones.designated(k, s.self)
	switch {
	case d == s.self:
		return true
	case slices.ContainsFunc(ps, func(p peer.AddrInfo) bool { return p.ID == d }):
		return false
	case s.inCrosserGrace(k):
		return false
	}
	ids := []peer.ID{s.self}
	for _, p := range same {
		ids = append(ids, p.ID)
	}
	first := rank(k, 0, ids)[0] == s.self
	s.log.Debug("zone's designated crosser not among the providers; choosing among them", "key", k, "designated", d.String(), "crosses", first, "providers", len(ps))
	return first
}

// inCrosserGrace reports whether this node still waits for k's designated
// crosser: for crosserGrace from the first time it asked, again after a
// long quiet (a later pull of the blob).
func (s *Source) inCrosserGrace(k blob.Key) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	until, ok := s.crosserWait[k]
	if !ok || now.After(until.Add(wholeHold)) {
		s.crosserWait = s.crosserWait.set(k, now.Add(crosserGrace), now)
		return true
	}
	return now.Before(until)
}

// zoneWaiting reports whether a fetch of k may be waiting for its zone's
// copy (its provider list should then be fresh).
func (s *Source) zoneWaiting(k blob.Key) bool {
	if s.zones == nil || s.zones.mine() == "" {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	return s.crossing.live(k, now) || s.whole.live(k, now)
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

// probeWhole asks, with a one-byte range, whether a whole copy of k exists
// (the answer's whole mark, or a holder's wait for other askers), unless
// this node is its zone's designated crosser for k: every other node of the
// zone then waits for that copy (zoneGate), and its first chunk does not
// cross zones only to learn that.
func (s *Source) probeWhole(ctx context.Context, ps []peer.AddrInfo, k blob.Key, off int64) {
	if s.zones.designated(k, s.self) == s.self {
		return
	}
	res, _, err := s.hedgedOnce(ctx, ps, k, off, 1, false)
	if err == nil {
		res.rc.Close()
		res.cancel()
		return
	}
	if be := (*BusyError)(nil); errors.As(err, &be) && be.waitsForOthers() {
		s.markWhole(k)
	}
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
	return ok && other && s.isCrosser(k, ps, same)
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

// otherZone reports whether p is known to be in a zone other than this
// node's. A hedge never goes there: the loser's bytes in flight would cross
// zones for nothing, and those are the bytes zones exist to save.
func (s *Source) otherZone(p peer.AddrInfo) bool {
	if s.zones == nil {
		return false
	}
	mine := s.zones.mine()
	z := s.zones.of(p.ID)
	return mine != "" && z != "" && z != mine
}
