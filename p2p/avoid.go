package p2p

import (
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
)

const (
	// A peer that failed is not asked for a while (doubling while it keeps
	// failing); one whose bytes failed verification, for longer.
	errorAvoid    = 5 * time.Second
	maxErrorAvoid = 2 * time.Minute
	blameAvoid    = 10 * time.Minute
)

type avoidEntry struct {
	until  time.Time
	blamed bool
	fails  int
	reason string
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
