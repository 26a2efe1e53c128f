package p2p

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
)

func TestDialBack(t *testing.T) {
	if testing.Short() {
		t.Skip("starts libp2p hosts")
	}
	ctx := context.Background()
	a := startNode(t, nil)
	if _, err := a.DialBack(ctx); !errors.Is(err, ErrNoPeer) {
		t.Fatalf("lone node: err = %v, want ErrNoPeer", err)
	}
	b := startNode(t, nil, a)
	a.ServeDialBack()
	waitFor(t, "b connected to a", func() bool { return b.connected(a.ID()) })

	r, err := b.DialBack(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Peer != a.ID().String() || len(r.Ports) != 2 {
		t.Fatalf("answer %+v: want two ports dialled by %s", r, a.ID())
	}
	for _, p := range r.Ports {
		if p.Err != "" || !strings.HasPrefix(p.Addr, "127.0.0.1:") {
			t.Errorf("port %+v: want reached at 127.0.0.1", p)
		}
	}
	_, peerPort, _ := net.SplitHostPort(b.PeerAddr())
	if r.Ports[1].Name != "peer" || !strings.HasSuffix(r.Ports[1].Addr, ":"+peerPort) {
		t.Errorf("peer port %+v, want :%s", r.Ports[1], peerPort)
	}
	// One clock: the estimate is off by at most half the round trip.
	if off := max(r.ClockOffset, -r.ClockOffset); off > r.RTT {
		t.Errorf("clock offset %v larger than the round trip %v", r.ClockOffset, r.RTT)
	}

	// A closed port is reported, not hidden.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	r, err = b.dialBack(ctx, a.ID(), dialBackRequest{Ports: []dialBackPort{{Name: "p2p", Port: closed}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Ports) != 1 || !strings.Contains(r.Ports[0].Err, "refused") {
		t.Errorf("closed port: %+v, want connection refused", r.Ports)
	}

	// Bad requests get a reason.
	for _, req := range []dialBackRequest{{}, {Ports: []dialBackPort{{Port: 0}}}, {Ports: make([]dialBackPort, 5)}} {
		if _, err := b.dialBack(ctx, a.ID(), req); err == nil || !strings.Contains(err.Error(), "bad request") {
			t.Errorf("request %+v: err = %v, want bad request", req, err)
		}
	}
	// A node that does not answer dial-backs is an error, not a hang.
	if _, err := a.DialBack(ctx); err == nil {
		t.Error("b does not serve dial-back, yet a's DialBack succeeded")
	}
}
