package p2p

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
)

// maxZoneLen bounds a zone name: it is opaque (any label a cloud uses), but
// a peer's answer must not grow without bound.
const maxZoneLen = 63

// cleanZone makes a zone name safe to send, keep and show: printable ASCII
// without spaces, at most maxZoneLen bytes; anything else is replaced.
func cleanZone(z string) string {
	z = strings.TrimSpace(z)
	if len(z) > maxZoneLen {
		z = z[:maxZoneLen]
	}
	return strings.Map(func(r rune) rune {
		if r <= ' ' || r > '~' {
			return '_'
		}
		return r
	}, z)
}

// zones knows this node's zone and the zones its peers told it.
type zones struct {
	self  atomic.Pointer[string]
	mu    sync.Mutex
	peers map[peer.ID]string
}

func (z *zones) mine() string {
	if p := z.self.Load(); p != nil {
		return *p
	}
	return ""
}

func (z *zones) learn(p peer.ID, zone string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	if z.peers == nil {
		z.peers = map[peer.ID]string{}
	}
	if zone == "" {
		delete(z.peers, p)
		return
	}
	if len(z.peers) >= maxPeerStats {
		clear(z.peers) // relearned as connections are made again
	}
	z.peers[p] = zone
}

func (z *zones) of(p peer.ID) string {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.peers[p]
}

// members lists the peers known to be in zone.
func (z *zones) members(zone string) []peer.ID {
	z.mu.Lock()
	defer z.mu.Unlock()
	var out []peer.ID
	for p, pz := range z.peers {
		if pz == zone {
			out = append(out, p)
		}
	}
	return out
}

// designated is k's designated crosser in this node's zone: the first by
// rendezvous of self and every peer known to be in the zone (isCrosser).
func (z *zones) designated(k blob.Key, self peer.ID) peer.ID {
	return rank(k, 0, append(z.members(z.mine()), self))[0]
}

// relation is "same" or "cross" when both zones are known, else "unknown".
func (z *zones) relation(p peer.ID) string { return zoneRelation(z.mine(), z.of(p)) }

// zoneRelation is "same" or "cross" when both zones are set, else "unknown".
func zoneRelation(mine, theirs string) string {
	switch {
	case mine == "" || theirs == "":
		return "unknown"
	case mine == theirs:
		return "same"
	}
	return "cross"
}

// SetZone sets the zone this node tells its peers (--zone, or the Node's
// topology label in Kubernetes): askers in the same zone prefer it.
func (n *Node) SetZone(zone string) {
	z := cleanZone(zone)
	if z != strings.TrimSpace(zone) {
		n.log.Warn("zone name shortened to 63 bytes and non-printable bytes replaced", "zone", z)
	}
	n.zones.self.Store(&z)
}

// Zone is the zone this node tells its peers ("" when none).
func (n *Node) Zone() string { return n.zones.mine() }

// sameZoneFirst moves the providers known to be in this node's zone to the
// front, keeping the order within each group: a chunk crosses zones only
// when no holder in the zone has it.
func (z *zones) sameZoneFirst(ps []peer.AddrInfo) []peer.AddrInfo {
	mine := z.mine()
	if mine == "" || len(ps) < 2 {
		return ps
	}
	out := make([]peer.AddrInfo, 0, len(ps))
	var other []peer.AddrInfo
	for _, p := range ps {
		if z.of(p.ID) == mine {
			out = append(out, p)
		} else {
			other = append(other, p)
		}
	}
	return append(out, other...)
}

// learnZones asks the providers whose zone is not known yet for their
// data-plane address and zone, in the background (at most a few at a
// time), so the next chunk can prefer a holder in this node's zone.
func (c *dataClient) learnZones(ps []peer.AddrInfo) {
	for _, p := range ps {
		c.mu.Lock()
		_, known := c.peers[p.ID]
		pending := c.asking[p.ID]
		if !known && !pending && len(c.asking) < 8 {
			if c.asking == nil {
				c.asking = map[peer.ID]bool{}
			}
			c.asking[p.ID] = true
		} else {
			pending = true
		}
		c.mu.Unlock()
		if known || pending {
			continue
		}
		go func(ai peer.AddrInfo) {
			ctx, cancel := context.WithTimeout(c.n.ctx, 5*time.Second)
			defer cancel()
			c.conn(ctx, ai) // learns the zone with the address; failures are the fetch's to see
			c.mu.Lock()
			delete(c.asking, ai.ID)
			c.mu.Unlock()
		}(p)
	}
}

// ZoneBytes is what this node received from and served to peers, by the
// peer's zone against this node's.
type ZoneBytes struct {
	ReceivedSame, ReceivedCross, ReceivedUnknown int64
	ServedSame, ServedCross, ServedUnknown       int64
}

// zoneCounters keep ZoneBytes for the debug page (the metrics have them too).
type zoneCounters struct {
	received, served [3]atomic.Int64 // by relationIndex
}

func relationIndex(rel string) int {
	switch rel {
	case "same":
		return 0
	case "cross":
		return 1
	}
	return 2
}

// ZoneBytes reports the blob bytes received and served by zone relation.
func (n *Node) ZoneBytes() ZoneBytes {
	c := &n.zoneBytes
	return ZoneBytes{
		ReceivedSame: c.received[0].Load(), ReceivedCross: c.received[1].Load(), ReceivedUnknown: c.received[2].Load(),
		ServedSame: c.served[0].Load(), ServedCross: c.served[1].Load(), ServedUnknown: c.served[2].Load(),
	}
}
