package p2p

import (
	"sort"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/transfer"
)

// maxPeerStats bounds the peers whose byte counts are kept; past it the
// counts of peers no longer connected go first.
const maxPeerStats = 4096

type peerStats struct {
	mu sync.Mutex
	m  map[peer.ID]*peerStat
}

type peerStat struct {
	served, read int64
}

func (s *peerStats) add(dir Direction, p peer.ID, b int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[peer.ID]*peerStat{}
	}
	st := s.m[p]
	if st == nil {
		st = &peerStat{}
		s.m[p] = st
	}
	if dir == Served {
		st.served += b
	} else {
		st.read += b
	}
}

// prune drops the counts of peers not in keep once there are too many.
func (s *peerStats) prune(keep map[peer.ID]bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.m) <= maxPeerStats {
		return
	}
	for p := range s.m {
		if !keep[p] {
			delete(s.m, p)
		}
	}
}

// PeerInfo is what the node knows of one peer, for the debug page.
type PeerInfo struct {
	ID             peer.ID
	Addr           string // the remote address of its connection
	Connected      bool
	ConnectedSince time.Time
	RTT            time.Duration // 0 when not measured
	ServedTo       int64         // blob bytes sent to it
	ReadFrom       int64         // blob bytes received from it
	Failures       int           // consecutive failed transfers
	LastFailure    string
	AvoidedUntil   time.Time // zero when it is asked as usual
	Zone           string    // the zone it told ("" when unknown)
}

// Peers lists the connected peers and the others the node exchanged bytes
// with or avoids, connected first, each group by ID.
func (n *Node) Peers() []PeerInfo {
	byID := map[peer.ID]*PeerInfo{}
	get := func(p peer.ID) *PeerInfo {
		pi := byID[p]
		if pi == nil {
			pi = &PeerInfo{ID: p}
			byID[p] = pi
		}
		return pi
	}
	connected := map[peer.ID]bool{}
	for _, c := range n.host.Network().Conns() {
		p := c.RemotePeer()
		pi := get(p)
		connected[p] = true
		opened := c.Stat().Opened
		if !pi.Connected || opened.Before(pi.ConnectedSince) {
			pi.Connected, pi.ConnectedSince, pi.Addr = true, opened, c.RemoteMultiaddr().String()
		}
	}
	n.stats.prune(connected)
	n.stats.mu.Lock()
	for p, st := range n.stats.m {
		pi := get(p)
		pi.ServedTo, pi.ReadFrom = st.served, st.read
	}
	n.stats.mu.Unlock()
	s := n.source
	s.mu.Lock()
	now := s.now()
	for p, a := range s.avoid {
		pi := get(p)
		pi.Failures, pi.LastFailure = a.fails, a.reason
		if now.Before(a.until) {
			pi.AvoidedUntil = a.until
		}
	}
	s.mu.Unlock()
	ps := n.host.Peerstore()
	out := make([]PeerInfo, 0, len(byID))
	for p, pi := range byID {
		if pi.Connected {
			pi.RTT = ps.LatencyEWMA(p)
		}
		pi.Zone = n.zones.of(p)
		out = append(out, *pi)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Connected != out[j].Connected {
			return out[i].Connected
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// NamedStore names a local store in the node's transfer records (a store
// without a name is the cache).
func NamedStore(name string, s LocalStore) LocalStore { return namedStore{s, name} }

type namedStore struct {
	LocalStore
	name string
}

var _ WholeStore = namedStore{}

// HoldsWhole forwards to the named store when it can tell.
func (s namedStore) HoldsWhole(k blob.Key) bool { return holdsWhole(s.LocalStore, k) }

// recordServe adds a transfer to a peer to the log, folded into the record
// of the same peer and blob when it follows it closely.
func (n *Node) recordServe(st LocalStore, k, p string, start time.Time, written int64, err error) {
	if n.cfg.Transfers == nil || written <= 0 && err == nil {
		return
	}
	var b transfer.Bytes
	if ns, ok := st.(namedStore); ok && ns.name == "containerd" {
		b.Containerd = written
	} else {
		b.Cache = written
	}
	result := "ok"
	if err != nil {
		result = "cut: " + err.Error()
	}
	n.cfg.Transfers.AddMerged(transfer.Record{Start: start, Face: transfer.FacePeer, Key: k, Peer: p, What: p,
		Bytes: b, Duration: time.Since(start), Result: result}, 2*time.Second)
}
