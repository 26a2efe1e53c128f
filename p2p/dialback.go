package p2p

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// dialBackProtocol: a node asks a connected peer to open TCP connections to
// the node's own ports, to learn whether other nodes can reach them (a
// firewall drops inbound connections, not the ones the node dials out).
const dialBackProtocol = protocol.ID("/peerd/dialback/1.0.0")

const (
	// dialBackPorts bounds the ports one request may name.
	dialBackPorts = 4
	// dialBackDial bounds one TCP connect of the answering peer.
	dialBackDial = 3 * time.Second
	// dialBackMax bounds a whole exchange.
	dialBackMax = 15 * time.Second
)

type dialBackRequest struct {
	Ports []dialBackPort `json:"ports"`
}

type dialBackPort struct {
	Name string `json:"name"`
	Port int    `json:"port"`
}

// dialBackClock is the answer's first line, written as soon as the request
// is read, so the asker can place the peer's clock within one round trip.
type dialBackClock struct {
	UnixNano int64  `json:"unix_nano"`
	Err      string `json:"err,omitempty"`
}

// DialBackPort is one connection attempt of the answering peer.
type DialBackPort struct {
	Name string `json:"name"`
	Addr string `json:"addr"`
	Err  string `json:"err,omitempty"`
}

// DialBackResult is a peer's answer to DialBack.
type DialBackResult struct {
	Peer  string
	Ports []DialBackPort
	// ClockOffset is the peer's clock minus this node's, give or take RTT/2.
	ClockOffset time.Duration
	RTT         time.Duration
}

// ErrNoPeer: DialBack found no connected peer to ask.
var ErrNoPeer = errors.New("no connected peer to ask")

// ServeDialBack answers peers' dial-back requests. The peer is dialled only
// at the IP its own connection comes from, so a request cannot aim this node
// at a third party; one request runs at a time and others are refused.
func (n *Node) ServeDialBack() {
	busy := make(chan struct{}, 1)
	n.host.SetStreamHandler(dialBackProtocol, func(s network.Stream) {
		defer s.Close()
		s.SetDeadline(time.Now().Add(dialBackMax))
		enc := json.NewEncoder(s)
		var req dialBackRequest
		if err := json.NewDecoder(io.LimitReader(s, 4096)).Decode(&req); err != nil {
			enc.Encode(dialBackClock{Err: "bad request: " + err.Error()})
			return
		}
		if len(req.Ports) == 0 || len(req.Ports) > dialBackPorts {
			enc.Encode(dialBackClock{Err: fmt.Sprintf("bad request: want 1 to %d ports", dialBackPorts)})
			return
		}
		for _, p := range req.Ports {
			if p.Port < 1 || p.Port > 65535 || len(p.Name) > 32 {
				enc.Encode(dialBackClock{Err: "bad request: bad port"})
				return
			}
		}
		ip, err := remoteIP(s.Conn().RemoteMultiaddr())
		if err != nil {
			enc.Encode(dialBackClock{Err: err.Error()})
			return
		}
		select {
		case busy <- struct{}{}:
		default:
			enc.Encode(dialBackClock{Err: "busy with another dial-back"})
			return
		}
		// The slot guards the dialling; it is free again before the answer
		// goes out, so an asker's next request never finds it taken by its
		// own last one.
		release := sync.OnceFunc(func() { <-busy })
		defer release()
		if enc.Encode(dialBackClock{UnixNano: time.Now().UnixNano()}) != nil {
			return
		}
		out := make([]DialBackPort, 0, len(req.Ports))
		for _, p := range req.Ports {
			addr := net.JoinHostPort(ip.String(), strconv.Itoa(p.Port))
			r := DialBackPort{Name: p.Name, Addr: addr}
			if err := n.dialBackOne(p.Name, addr, s.Conn().RemotePeer()); err != nil {
				r.Err = dialErr(err)
			}
			out = append(out, r)
		}
		release()
		enc.Encode(out)
	})
}

// dialBackOne connects to addr. The peer port gets a full TLS handshake as
// this node's data-plane client, which checks the asker answers there and
// leaves no failed handshake in the asker's log.
func (n *Node) dialBackOne(name, addr string, asker peer.ID) error {
	d := &net.Dialer{Timeout: dialBackDial}
	if name != "peer" || n.client == nil || n.client.base == nil {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	}
	conf := n.client.base.Clone()
	conf.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
		got, err := peerFromCerts(raw)
		if err != nil {
			return err
		}
		if got != asker {
			return fmt.Errorf("%s answers as %s", addr, got)
		}
		return nil
	}
	d.Deadline = time.Now().Add(dialBackDial)
	c, err := tls.DialWithDialer(d, "tcp", addr, conf)
	if err != nil {
		return err
	}
	return c.Close()
}

// dialErr is the short reason a connect failed ("connection refused", "i/o timeout").
func dialErr(err error) string {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		if errors.Is(err, context.DeadlineExceeded) || oe.Timeout() {
			return "i/o timeout"
		}
		return oe.Err.Error()
	}
	return err.Error()
}

func remoteIP(a ma.Multiaddr) (net.IP, error) {
	na, err := manet.ToNetAddr(a)
	if err != nil {
		return nil, fmt.Errorf("cannot dial back %s: %v", a, err)
	}
	switch x := na.(type) {
	case *net.TCPAddr:
		return x.IP, nil
	case *net.UDPAddr:
		return x.IP, nil
	}
	return nil, fmt.Errorf("cannot dial back %s", a)
}

// listenPorts are the TCP ports this node's libp2p host and data plane listen on.
func (n *Node) listenPorts() []dialBackPort {
	var out []dialBackPort
	for _, a := range n.host.Network().ListenAddresses() {
		if p, err := a.ValueForProtocol(ma.P_TCP); err == nil {
			if port, err := strconv.Atoi(p); err == nil {
				out = append(out, dialBackPort{Name: "p2p", Port: port})
				break
			}
		}
	}
	if _, p, err := net.SplitHostPort(n.PeerAddr()); err == nil {
		if port, err := strconv.Atoi(p); err == nil {
			out = append(out, dialBackPort{Name: "peer", Port: port})
		}
	}
	return out
}

// DialBack asks a connected peer (a random one; the next when one does not
// answer, at most three) to connect to this node's p2p and peer ports, and
// reads its clock on the way.
func (n *Node) DialBack(ctx context.Context) (DialBackResult, error) {
	peers := n.host.Network().Peers()
	if len(peers) == 0 {
		return DialBackResult{}, ErrNoPeer
	}
	rand.Shuffle(len(peers), func(i, j int) { peers[i], peers[j] = peers[j], peers[i] })
	req := dialBackRequest{Ports: n.listenPorts()}
	var errs []error
	for _, p := range peers[:min(3, len(peers))] {
		r, err := n.dialBack(ctx, p, req)
		if err == nil {
			return r, nil
		}
		errs = append(errs, fmt.Errorf("peer %s: %w", p, err))
		if ctx.Err() != nil {
			break
		}
	}
	return DialBackResult{}, errors.Join(errs...)
}

func (n *Node) dialBack(ctx context.Context, pid peer.ID, req dialBackRequest) (DialBackResult, error) {
	ctx, cancel := context.WithTimeout(ctx, dialBackMax)
	defer cancel()
	var res DialBackResult
	s, err := n.host.NewStream(ctx, pid, dialBackProtocol)
	if err != nil {
		return res, err
	}
	defer s.Close()
	if d, ok := ctx.Deadline(); ok {
		s.SetDeadline(d)
	}
	t0 := time.Now()
	if err := json.NewEncoder(s).Encode(req); err != nil {
		return res, err
	}
	dec := json.NewDecoder(bufio.NewReader(io.LimitReader(s, 64<<10)))
	var clock dialBackClock
	if err := dec.Decode(&clock); err != nil {
		return res, fmt.Errorf("read answer: %w", err)
	}
	t1 := time.Now()
	if clock.Err != "" {
		return res, errors.New(clock.Err)
	}
	res.Peer = pid.String()
	res.RTT = t1.Sub(t0)
	res.ClockOffset = time.Unix(0, clock.UnixNano).Sub(t0.Add(res.RTT / 2))
	if err := dec.Decode(&res.Ports); err != nil {
		return res, fmt.Errorf("read answer: %w", err)
	}
	return res, nil
}

// BootstrapPeers is how many bootstrap addresses the node knows (flags and
// discovery).
func (n *Node) BootstrapPeers() int { return len(n.bootstrapPeers()) }
