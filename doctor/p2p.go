package doctor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"
)

// Peers is the daemon's peer network.
type Peers interface {
	RoutingTableSize() int
	ConnectedPeers() int
	// BootstrapPeers is how many bootstrap addresses the node knows.
	BootstrapPeers() int
	// DialBack asks one connected peer to open a TCP connection to each of
	// this node's ports, from the peer's side, and to tell its clock.
	DialBack(ctx context.Context) (DialBack, error)
}

// DialBack is a peer's answer.
type DialBack struct {
	Peer string // the peer that dialled
	// Ports are the peer's attempts, one per port of this node.
	Ports []PortCheck
	// ClockOffset is the peer's clock minus this node's, give or take RTT/2.
	ClockOffset time.Duration
	RTT         time.Duration
}

// PortCheck is one dial from the peer.
type PortCheck struct {
	Name string `json:"name"` // "p2p" or "peer"
	Addr string `json:"addr"` // what the peer dialled
	Err  string `json:"err,omitempty"`
}

// ErrNoPeer is returned by DialBack when no peer is connected.
var ErrNoPeer = errors.New("no connected peer to ask")

// Clock offsets: a node's TLS certificate is valid from an hour before it
// was made, so a peer whose clock is an hour behind rejects it; minutes of
// offset mean the clock is not synchronised at all.
const (
	clockWarn = 5 * time.Minute
	clockFail = 50 * time.Minute
)

// CheckRouting: the routing table's size and whether bootstrap reached anyone.
func CheckRouting(ctx context.Context, in *Input) []Result {
	const name = "p2p_routing"
	if in.Peers == nil {
		return []Result{{Check: name, Status: OK, Saw: "peer network off in this process"}}
	}
	size, conn, boot := in.Peers.RoutingTableSize(), in.Peers.ConnectedPeers(), in.Peers.BootstrapPeers()
	saw := fmt.Sprintf("%d peer(s) in the routing table, %d connected, %d bootstrap address(es)", size, conn, boot)
	switch {
	case conn > 0 && size > 0:
		return []Result{{Check: name, Status: OK, Saw: saw}}
	case boot > 0:
		return []Result{{Check: name, Status: Fail, Saw: saw + ": bootstrap reached nobody",
			Fix: fmt.Sprintf("check that the bootstrap peers run and that TCP port %s is open between nodes", in.P2PPort)}}
	}
	return []Result{{Check: name, Status: Warn, Saw: saw + ": alone, no bootstrap address and no peer dialled in",
		Fix: "pass --bootstrap or --bootstrap-mode k8s-lease/dns (a single node has nobody to share with)"}}
}

// CheckReachable: a connected peer can open both ports of this node, and
// its clock agrees with this node's closely enough for TLS.
func CheckReachable(ctx context.Context, in *Input) []Result {
	if in.Peers == nil {
		return []Result{{Check: "p2p_reachable", Status: OK, Saw: "peer network off in this process"}}
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	db, err := in.Peers.DialBack(ctx)
	if err != nil {
		st := Warn
		fix := "wait for a peer to connect, then run the doctor again"
		if !errors.Is(err, ErrNoPeer) {
			fix = "check the peer's log; it may run an older peerd without dial-back"
		}
		return []Result{
			{Check: "p2p_reachable", Status: st, Saw: "not checked: " + err.Error(), Fix: fix},
			{Check: "clock", Status: st, Saw: "not checked: " + err.Error(), Fix: fix},
		}
	}
	var bad, good []string
	var badPorts []string
	for _, p := range db.Ports {
		if p.Err != "" {
			bad = append(bad, fmt.Sprintf("%s %s: %s", p.Name, p.Addr, p.Err))
			if _, port, err := net.SplitHostPort(p.Addr); err == nil {
				badPorts = append(badPorts, port)
			}
		} else {
			good = append(good, p.Name+" "+p.Addr)
		}
	}
	out := make([]Result, 0, 2)
	if len(bad) > 0 {
		out = append(out, Result{Check: "p2p_reachable", Status: Fail,
			Saw: fmt.Sprintf("peer %s cannot reach %s", short(db.Peer), strings.Join(bad, "; ")),
			Fix: fmt.Sprintf("allow inbound TCP port(s) %s from the other nodes (firewall, security group, NetworkPolicy)", strings.Join(badPorts, ","))})
	} else {
		out = append(out, Result{Check: "p2p_reachable", Status: OK, Saw: fmt.Sprintf("peer %s reached %s", short(db.Peer), strings.Join(good, ", "))})
	}
	off := db.ClockOffset.Round(time.Millisecond)
	abs := max(off, -off)
	saw := fmt.Sprintf("offset to peer %s: %v (±%v)", short(db.Peer), off, (db.RTT / 2).Round(time.Millisecond))
	fix := "synchronise the nodes' clocks (chrony or systemd-timesyncd against one NTP source)"
	switch {
	case abs >= clockFail:
		out = append(out, Result{Check: "clock", Status: Fail, Saw: saw + ": certificates are valid from an hour before they were made, so TLS between them fails", Fix: fix})
	case abs >= clockWarn:
		out = append(out, Result{Check: "clock", Status: Warn, Saw: saw + ": the clocks are not synchronised", Fix: fix})
	default:
		out = append(out, Result{Check: "clock", Status: OK, Saw: saw})
	}
	return out
}

// short trims a peer ID for a terminal line.
func short(id string) string {
	if len(id) > 16 {
		return id[:6] + "…" + id[len(id)-6:]
	}
	return id
}
