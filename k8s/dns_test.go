package k8s

import (
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multiaddr"
)

// libp2pHost adapts a real libp2p host to Host.
type libp2pHost struct{ host.Host }

func (h libp2pHost) Addrs() []multiaddr.Multiaddr {
	out, _ := peer.AddrInfoToP2pAddrs(&peer.AddrInfo{ID: h.ID(), Addrs: h.Host.Addrs()})
	return out
}
func (h libp2pHost) LivePeers() int { return len(h.Network().Peers()) }

func newLibp2pHost(t *testing.T, ip string) libp2pHost {
	t.Helper()
	return newLibp2pHostAt(t, "/ip4/"+ip+"/tcp/0")
}

func itoa(n int) string { return strconv.Itoa(n) }

func newLibp2pHostAt(t *testing.T, listen string) libp2pHost {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings(listen), libp2p.DisableRelay())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return libp2pHost{h}
}

func tcpPort(t *testing.T, h Host) string {
	t.Helper()
	p := ownTCPPort(h.Addrs())
	if p == 0 {
		t.Fatalf("no tcp port in %v", h.Addrs())
	}
	return strconv.Itoa(p)
}

func TestProbePeerIDLearnsTheRealID(t *testing.T) {
	a, b := newLibp2pHost(t, "127.0.0.1"), newLibp2pHost(t, "127.0.0.2")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	id, err := ProbePeerID(ctx, b, multiaddr.StringCast("/ip4/127.0.0.1/tcp/"+tcpPort(t, a)))
	if err != nil {
		t.Fatal(err)
	}
	if id != a.ID() {
		t.Fatalf("probe found %s, want %s", id, a.ID())
	}
	// The learned ID dials for real.
	if err := b.Connect(ctx, peer.AddrInfo{ID: id, Addrs: a.Host.Addrs()}); err != nil {
		t.Fatalf("connect with the learned ID: %v", err)
	}
}

func TestProbePeerIDRefusesNonLibp2p(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n"))
			c.Close()
		}
	}()
	b := newLibp2pHost(t, "127.0.0.2")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	if id, err := ProbePeerID(ctx, b, multiaddr.StringCast("/ip4/127.0.0.1/tcp/"+port)); err == nil {
		t.Fatalf("probe of a non-libp2p server found %s", id)
	}
}

func TestDNSDiscover(t *testing.T) {
	a, b := newLibp2pHost(t, "127.0.0.1"), newLibp2pHost(t, "127.0.0.2")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// From b, a's address (an IP literal resolves to itself) yields a.
	d, err := NewDNS(b, DNSOptions{Name: "127.0.0.1:" + tcpPort(t, a)})
	if err != nil {
		t.Fatal(err)
	}
	ps, err := d.Discover(ctx)
	if err != nil || len(ps) != 1 || ps[0].ID != a.ID() {
		t.Fatalf("Discover = %v, %v; want %s", ps, err, a.ID())
	}

	// From a, the name answers only a's own IP: alone, nobody dialed.
	d, err = NewDNS(a, DNSOptions{Name: "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	ps, err = d.Discover(ctx)
	if err != nil || len(ps) != 0 {
		t.Fatalf("Discover of only itself = %v, %v; want alone", ps, err)
	}

	// Nothing listens: an error for the bootstrap loop to retry.
	d, _ = NewDNS(b, DNSOptions{Name: "127.0.0.3:1"})
	if ps, err := d.Discover(ctx); err == nil {
		t.Fatalf("Discover with nobody listening = %v, want an error", ps)
	}
}

func TestNewDNSRejectsBadNames(t *testing.T) {
	h := newFakeHost("x")
	for _, name := range []string{"", "svc:0", "svc:99999", "svc:http"} {
		if _, err := NewDNS(h, DNSOptions{Name: name}); err == nil {
			t.Errorf("NewDNS(%q) accepted", name)
		}
	}
}
