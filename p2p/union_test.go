package p2p

import (
	"slices"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
)

// The gather window's second lookup is merged into the first one's answer:
// every peer of the first stays, in its order, those only the second found
// follow, and a peer both found is listed once.
func TestUnionPeersKeepsEachPeerOnce(t *testing.T) {
	a, b, c, d := newPeerID(t), newPeerID(t), newPeerID(t), newPeerID(t)
	first := []peer.AddrInfo{{ID: a}, {ID: b}}
	second := []peer.AddrInfo{{ID: c}, {ID: b}, {ID: a}, {ID: d}, {ID: c}}
	got := unionPeers(first, second)
	var ids []peer.ID
	for _, p := range got {
		ids = append(ids, p.ID)
	}
	if want := []peer.ID{a, b, c, d}; !slices.Equal(ids, want) {
		t.Fatalf("union %v, want %v", ids, want)
	}
	if len(first) != 2 || first[0].ID != a || first[1].ID != b {
		t.Fatalf("the first answer was changed: %v", first)
	}
}
