package p2p

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus"
)

// Cold-burst swarming without a control plane (see README "Swarming").
//
// Every node pulling a blob from its origin advertises it when the pull
// starts, so the DHT's provider list of a blob is the set of nodes that hold
// or want it. Each chunk (named by its offset) has one owner among them and
// this node: the peer with the highest rendezvous score sha256(digest,
// offset, peer ID). The owner fetches the chunk from the origin; the others
// ask the owner, whose server waits for the chunk (or starts its fill) for up
// to --swarm-wait. Every node computes the same owner from the same list, a
// node joining or leaving moves only its own share, and a node whose list
// lags simply causes a chunk to be fetched twice.

const (
	// swarmRefresh bounds the age of the provider list a swarm pull uses:
	// during a burst the set of nodes pulling a blob changes by the second.
	swarmRefresh = 200 * time.Millisecond
	// swarmGather is how long after a swarm pull's first lookup found
	// nobody its chunks (all but the one its reader waits for) look again:
	// nodes that start at the same moment announce within a few
	// milliseconds of each other, and an answer given before those
	// announcements landed would make every node the owner of every chunk
	// it starts in the meantime (the whole read-ahead window, from the
	// origin). See firstSwarmLookup.
	swarmGather = 250 * time.Millisecond
	// ownerLookup bounds the provider lookup the server side makes to decide
	// whether it owns a chunk (normally answered from the cached list).
	ownerLookup = 50 * time.Millisecond
)

// score is the rendezvous weight of peer p for the chunk at off of k.
func score(k blob.Key, off int64, p peer.ID) uint64 {
	h := sha256.New()
	h.Write([]byte(k))
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(off))
	h.Write(b[:])
	h.Write([]byte(p))
	sum := h.Sum(nil)
	return binary.BigEndian.Uint64(sum[:8])
}

// rank orders candidates by descending score for the chunk at off.
func rank(k blob.Key, off int64, ids []peer.ID) []peer.ID {
	type scored struct {
		id peer.ID
		s  uint64
	}
	ss := make([]scored, len(ids))
	for i, id := range ids {
		ss[i] = scored{id, score(k, off, id)}
	}
	slices.SortFunc(ss, func(a, b scored) int {
		switch {
		case a.s > b.s:
			return -1
		case a.s < b.s:
			return 1
		}
		return 0
	})
	out := make([]peer.ID, len(ss))
	for i, x := range ss {
		out[i] = x.id
	}
	return out
}

// owner returns the owner of the chunk at off among self and ps.
func (s *Source) owner(k blob.Key, off int64, ps []peer.AddrInfo) peer.ID {
	ids := make([]peer.ID, 0, len(ps)+1)
	ids = append(ids, s.self)
	for _, p := range ps {
		ids = append(ids, p.ID)
	}
	return rank(k, off, ids)[0]
}

// FetchShared is Fetch for a chunk of a swarm pull: the cache's plan has an
// origin behind the peers (blob.Swarm). The chunk's rendezvous owner is
// asked first and waits for the chunk it is fetching; the other providers
// are asked after the hedge delay and answer at once unless they hold the
// chunk. When this node owns the chunk, peers that already hold it still
// serve it (a blob complete elsewhere never goes to the origin), and one
// fetching it from the origin right now lets us wait for it; otherwise the
// answer is blob.ErrNotFound and the cache fetches it from the origin.
func (s *Source) FetchShared(ctx context.Context, k blob.Key, off, n int64) (blob.Share, error) {
	if !k.Verifiable() {
		return blob.Share{}, fmt.Errorf("%s: %w (only digests are shared)", k, blob.ErrNotFound)
	}
	ps, spec := s.swarmProviders(ctx, k, swarmRefresh)
	ps = s.order(ps)
	if len(ps) == 0 {
		if err := ctx.Err(); err != nil {
			if spec != nil {
				spec.release()
			}
			return blob.Share{}, err
		}
		if spec != nil {
			// The pull's first chunk, and nobody seen pulling the blob yet;
			// nodes starting with us may still show up (firstSwarmLookup).
			// The chunk comes from the origin now and is left to its owner
			// if one of them owns it (Yields).
			s.swarmChunks.WithLabelValues("speculative").Inc()
			return blob.Share{Gathering: spec.gathering, Release: spec.release}, nil
		}
		return blob.Share{}, fmt.Errorf("%s: %w (no peer advertises it)", k, blob.ErrNotFound)
	}
	if s.owner(k, off, ps) == s.self {
		s.swarmChunks.WithLabelValues("self").Inc()
	} else {
		s.swarmChunks.WithLabelValues("peer").Inc()
	}
	again := func() []peer.AddrInfo {
		ps, _ := s.swarmProviders(ctx, k, swarmRefresh)
		return s.swarmOrder(k, off, s.order(ps))
	}
	res, rest, err := s.hedgedOpt(ctx, s.swarmOrder(k, off, ps), again, k, off, n, false)
	if err != nil {
		return blob.Share{}, err
	}
	want := n
	if n < 0 || n > res.total-off {
		want = res.total - off
	}
	return blob.Share{Body: &peerReader{s: s, ctx: ctx, k: k, off: off, want: want, total: res.total,
		cur: res, rest: rest, held: res.held, origins: []string{res.p.ID.String()}}, Size: res.total}, nil
}

// swarmOrder orders a swarm chunk's providers: when this node owns the
// chunk, spread like any chunk (providers answer at once unless they hold
// the chunk, fetch it from the origin right now, or believe they own it too,
// then they answer within the cache's peerStageWait: no cycle of waits is
// possible); otherwise the owner first and the others behind it, spread.
func (s *Source) swarmOrder(k blob.Key, off int64, ps []peer.AddrInfo) []peer.AddrInfo {
	if s.knowsWhole(k) {
		// A holder has it whole: chunks need no owner, only a holder.
		return s.spread(k, off, ps)
	}
	own := s.owner(k, off, ps)
	if own == s.self {
		return s.spread(k, off, ps)
	}
	i := slices.IndexFunc(ps, func(p peer.AddrInfo) bool { return p.ID == own })
	if i < 0 {
		return s.spread(k, off, ps)
	}
	return append([]peer.AddrInfo{ps[i]}, s.spread(k, off, slices.Delete(slices.Clone(ps), i, i+1))...)
}

// Yields reports, once a speculative first chunk's gathering ended, whether
// another node owns the chunk at off: the cache then drops its origin fetch
// and reads the chunk through FetchShared.
func (s *Source) Yields(k blob.Key, off int64) bool {
	yield := !s.Owns(k, off)
	if yield {
		s.swarmChunks.WithLabelValues("yielded").Inc()
	}
	return yield
}

// Owns reports whether this node owns the chunk at off of k among the nodes
// advertising k, as far as its provider list says. The peer server fetches
// such a chunk from the origin when a peer asks for it before it arrived.
// It never starts a lookup: the node's own pull keeps the list fresh, and a
// list it has not got yet (its first lookup is still gathering) counts as
// "only me" — the asker named this node the owner, so fetching is right.
// A blob a provider holds whole has no owners.
func (s *Source) Owns(k blob.Key, off int64) bool {
	if s.knowsWhole(k) {
		// Nobody needs this node to fetch a chunk from the origin: a
		// provider holds the blob whole (markWhole).
		return false
	}
	ctx, cancel := context.WithTimeout(s.bg, ownerLookup)
	defer cancel()
	return s.owner(k, off, s.order(s.knownProviders(ctx, k))) == s.self
}

// knownProviders is the cached provider list of k, waiting (until ctx ends)
// for a lookup in progress, without starting one.
func (s *Source) knownProviders(ctx context.Context, k blob.Key) []peer.AddrInfo {
	s.mu.Lock()
	e := s.provs[k]
	s.mu.Unlock()
	if e == nil {
		return nil
	}
	return s.peersWhen(ctx, e.done, e)
}

func newSwarmChunks() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "peerd_p2p_swarm_chunks_total",
		Help: "Chunks of swarm pulls (an origin behind the peers) by their rendezvous owner: self (fetched from the origin unless a peer holds it) or peer; speculative: a pull's first chunk fetched from the origin before the nodes pulling with it could be seen; yielded: such a chunk then left to the node that owns it.",
	}, []string{"owner"})
}

// Collectors are the Source's metrics for the daemon's registry.
func (s *Source) Collectors() []prometheus.Collector {
	return []prometheus.Collector{s.swarmChunks}
}

// expectWait is how long a swarm pull's first chunk waits for the first
// lookup of a blob peers are expected to hold (ExpectHeld) before it starts
// from the origin anyway; expectHold is how long that expectation lasts.
const (
	expectWait = 500 * time.Millisecond
	expectHold = 2 * time.Minute
)

// ExpectHeld notes that peers likely hold ks: the image manifest naming
// them came from a peer. A swarm pull of one of them then waits for its
// first lookup (up to expectWait) instead of --miss-hedge before its first
// chunk goes to the origin, so the nodes of a rollout, whose lookups are
// slow under the load of the rollout itself, do not each fetch a first
// chunk the first node holds. A lookup that finds nobody still ends the
// wait at once.
func (s *Source) ExpectHeld(ks []blob.Key) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	for _, k := range ks {
		s.expected = s.expected.set(k, now.Add(expectHold), now)
	}
}

func (s *Source) expectsHeld(k blob.Key) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.expected.live(k, s.now())
}
