package p2p

import (
	"fmt"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
)

// ParseBootstrap parses multiaddrs ending in /p2p/<id>, merging addresses of
// the same peer.
func ParseBootstrap(addrs []string) ([]peer.AddrInfo, error) {
	var mas []ma.Multiaddr
	for _, s := range addrs {
		m, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("bootstrap address %q: %w", s, err)
		}
		if _, err := m.ValueForProtocol(ma.P_P2P); err != nil {
			return nil, fmt.Errorf("bootstrap address %q: missing /p2p/<peer id>", s)
		}
		mas = append(mas, m)
	}
	return peer.AddrInfosFromP2pAddrs(mas...)
}

// bootstrapTag protects the connections to bootstrap peers from the
// connection manager's trimming and from releaseWhenJoined.
const bootstrapTag = "peerd-bootstrap"

// AddBootstrap adds bootstrap peers at runtime (static flags, a Kubernetes
// Lease holder, ...); the bootstrap loop dials them until one answers.
func (n *Node) AddBootstrap(ais ...peer.AddrInfo) {
	n.bootMu.Lock()
	added := 0
	for _, ai := range ais {
		if ai.ID == n.self || ai.ID == "" {
			continue
		}
		old := n.bootstrap[ai.ID]
		old.ID = ai.ID
		old.Addrs = ma.Unique(append(old.Addrs, ai.Addrs...))
		n.bootstrap[ai.ID] = old
		n.host.ConnManager().Protect(ai.ID, bootstrapTag)
		added++
	}
	n.bootMu.Unlock()
	if added > 0 {
		n.kickBootstrap()
	}
}

func (n *Node) kickBootstrap() {
	select {
	case n.bootKick <- struct{}{}:
	default:
	}
}

func (n *Node) bootstrapPeers() []peer.AddrInfo {
	n.bootMu.Lock()
	defer n.bootMu.Unlock()
	out := make([]peer.AddrInfo, 0, len(n.bootstrap))
	for _, ai := range n.bootstrap {
		out = append(out, ai)
	}
	return out
}

// The bootstrap loop's wait between rounds: it starts at bootMinWait and
// doubles up to bootMaxWait while the node is cut off; a connected node
// checks every bootMaxWait.
const bootMinWait, bootMaxWait = 250 * time.Millisecond, 30 * time.Second

// bootstrapLoop dials bootstrap peers until the node is connected, with
// backoff, and again whenever it loses every connection or new bootstrap
// peers are added.
func (n *Node) bootstrapLoop() {
	wait := bootMinWait
	refreshed := false
	lastSave := time.Now()
	for {
		boot, peers := n.dialCandidates()
		if time.Since(lastSave) > time.Minute && n.ConnectedPeers() > 0 {
			if err := savePeerBook(n.cfg.PeerBook, n.connectedAddrInfos()); err != nil {
				n.log.Debug("save peer book", "err", err)
			}
			lastSave = time.Now()
		}
		if n.dialIfCutOff(boot, peers, wait) {
			wait = bootMinWait
		}
		if n.joined.Swap(false) {
			refreshed = false
		}
		if !refreshed && n.ConnectedPeers() > 0 {
			if !n.refreshEveryBucket() {
				return
			}
			refreshed = true
		}
		var ok bool
		if wait, ok = n.bootstrapPause(wait); !ok {
			return
		}
	}
}

// dialCandidates returns the bootstrap peers, and those followed by the
// remembered peers that are not among them.
func (n *Node) dialCandidates() (boot, peers []peer.AddrInfo) {
	boot = n.bootstrapPeers()
	peers = slices.Clone(boot)
	known := make(map[peer.ID]bool, len(peers))
	for _, ai := range peers {
		known[ai.ID] = true
	}
	for _, ai := range n.remembered {
		if !known[ai.ID] && ai.ID != n.self {
			peers = append(peers, ai)
		}
	}
	return boot, peers
}

// dialIfCutOff dials when the node is cut off, and reports whether it
// reached anyone. Connected to nobody: it dials peers (the bootstrap and
// remembered ones). Connected, but to none of the bootstrap peers: it dials
// those. A node whose own dial failed while others joined through it
// otherwise stays, with them, an island the rest of the network never sees:
// their lookups and records reach only each other. wait is only logged.
func (n *Node) dialIfCutOff(boot, peers []peer.AddrInfo, wait time.Duration) bool {
	alone := n.ConnectedPeers() == 0
	island := !alone && len(boot) > 0 && !n.connectedToAny(boot)
	if island {
		peers = boot
	}
	if len(peers) == 0 || !(alone || island) {
		return false
	}
	ok, lastErr := n.dialAll(peers)
	switch {
	case ok > 0:
		n.log.Info("connected to bootstrap peers", "connected", ok, "of", len(peers))
		return true
	case island:
		n.log.Warn("connected to peers but to no bootstrap peer, which are unreachable; retrying", "peers", len(peers), "retry-in", wait, "last-err", lastErr)
	case len(n.bootstrapPeers()) > 0:
		n.log.Warn("no bootstrap peer reachable; retrying", "peers", len(peers), "retry-in", wait, "last-err", lastErr)
	default:
		n.log.Debug("no remembered peer reachable; retrying", "peers", len(peers), "retry-in", wait)
	}
	return false
}

// dialAll dials every peer of peers and returns how many it reached and the
// last error.
func (n *Node) dialAll(peers []peer.AddrInfo) (ok int, lastErr error) {
	for _, ai := range peers {
		// Our own backoff paces these dials; the swarm's per-peer dial
		// backoff (5 s and growing) would hide a peer that came back.
		if sw, isSwarm := n.host.Network().(*swarm.Swarm); isSwarm {
			sw.Backoff().Clear(ai.ID)
		}
		if err := n.Connect(n.ctx, ai); err != nil {
			n.log.Debug("bootstrap peer unreachable", "peer", ai.ID.String(), "err", err)
			lastErr = err
			continue
		}
		ok++
	}
	return ok, lastErr
}

// refreshEveryBucket fills the routing table beyond the bootstrap peers,
// every bucket of it, then has every held blob advertised again: kad-dht
// refreshes a bucket at most every 10 minutes, and its walk towards the
// node's own ID alone may not leave a group of more than 20 nodes that
// joined through each other (an island) for the bootstrap peer just
// reached. It reports false when the node is closing.
func (n *Node) refreshEveryBucket() bool {
	t := time.NewTimer(15 * time.Second)
	defer t.Stop()
	select {
	case <-n.dht.ForceRefresh():
	case <-t.C:
	case <-n.ctx.Done():
		return false
	}
	n.adv.kick()
	return true
}

// releaseMin is how many other peers a node must be connected to before it
// lets go of a peer it joined through; releaseWithin bounds how long it
// watches for that.
const (
	releaseMin    = 8
	releaseWithin = 2 * time.Minute
)

// releaseWhenJoined closes the connection to p, a peer the node joined
// through (Connect while connected to nobody), once the node is connected
// to releaseMin others. Every node of a Kubernetes cluster joins through
// the same Lease holder (or a few DNS-named peers): kept, those connections
// fill the holder's inbound limit and hold it full until its connection
// manager trims them after its grace period, refusing the next joiners
// meanwhile (bench row 9, the start storm). p stays in the routing table.
// A static --bootstrap peer is protected and kept: the island check needs
// it.
func (n *Node) releaseWhenJoined(p peer.ID) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	deadline := time.Now().Add(releaseWithin)
	for time.Now().Before(deadline) {
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		}
		if !n.connected(p) || n.host.ConnManager().IsProtected(p, bootstrapTag) {
			return
		}
		others := 0
		for _, q := range n.host.Network().Peers() {
			if q != p {
				others++
			}
		}
		if others < releaseMin {
			continue
		}
		if err := n.host.Network().ClosePeer(p); err == nil {
			n.m.joinReleased.Inc()
			n.log.Debug("released the peer this node joined through", "peer", p.String(), "connected", others)
		}
		return
	}
}

// bootstrapPause waits out one round of the bootstrap loop: wait, or less
// when kicked (then the next wait starts over). It returns the next wait,
// and false when the node is closing.
func (n *Node) bootstrapPause(wait time.Duration) (time.Duration, bool) {
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-n.ctx.Done():
		return 0, false
	case <-n.bootKick:
		return bootMinWait, true
	case <-t.C:
		if b := n.bootstrapPeers(); n.ConnectedPeers() == 0 || (len(b) > 0 && !n.connectedToAny(b)) {
			return min(wait*2, bootMaxWait), true
		}
		return bootMaxWait, true
	}
}

// connectedToAny reports whether the node has a connection to one of ais.
func (n *Node) connectedToAny(ais []peer.AddrInfo) bool {
	for _, ai := range ais {
		if n.connected(ai.ID) {
			return true
		}
	}
	return false
}
