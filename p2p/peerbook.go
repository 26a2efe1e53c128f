package p2p

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sort"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// The peer book remembers peers this node was connected to, across
// restarts. A node that others bootstrap from (the first node, a Lease
// leader) has no bootstrap peers of its own: after a restart nobody would
// dial it (they still have each other), and it would stay alone. With the
// book it dials the peers it knew, like any bootstrap list. Remembered peers
// do not decide readiness: a node whose remembered peers are all gone is a
// lone node, which is ready.

const maxRemembered = 64

type rememberedPeer struct {
	ID    string   `json:"id"`
	Addrs []string `json:"addrs"`
}

// loadPeerBook reads the book; a missing or damaged file is an empty book.
func loadPeerBook(path string) []peer.AddrInfo {
	if path == "" {
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var rs []rememberedPeer
	if json.Unmarshal(b, &rs) != nil {
		return nil
	}
	var out []peer.AddrInfo
	for _, r := range rs {
		id, err := peer.Decode(r.ID)
		if err != nil {
			continue
		}
		ai := peer.AddrInfo{ID: id}
		for _, s := range r.Addrs {
			if a, err := ma.NewMultiaddr(s); err == nil {
				ai.Addrs = append(ai.Addrs, a)
			}
		}
		if len(ai.Addrs) > 0 {
			out = append(out, ai)
		}
		if len(out) == maxRemembered {
			break
		}
	}
	return out
}

// savePeerBook writes the connected peers (at most maxRemembered, in a
// stable order) through a temporary file and a rename.
func savePeerBook(path string, peers []peer.AddrInfo) error {
	if path == "" || len(peers) == 0 {
		return nil
	}
	sort.Slice(peers, func(i, j int) bool { return peers[i].ID < peers[j].ID })
	if len(peers) > maxRemembered {
		peers = peers[:maxRemembered]
	}
	rs := make([]rememberedPeer, 0, len(peers))
	for _, ai := range peers {
		r := rememberedPeer{ID: ai.ID.String()}
		for _, a := range ai.Addrs {
			r.Addrs = append(r.Addrs, a.String())
		}
		if len(r.Addrs) > 0 {
			rs = append(rs, r)
		}
	}
	b, err := json.Marshal(rs)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// connectedAddrInfos lists connected peers with the addresses they listen on.
func (n *Node) connectedAddrInfos() []peer.AddrInfo {
	var out []peer.AddrInfo
	for _, p := range n.host.Network().Peers() {
		ai := n.host.Peerstore().PeerInfo(p)
		if len(ai.Addrs) > 0 {
			out = append(out, ai)
		}
	}
	return out
}
