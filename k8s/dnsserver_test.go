package k8s

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"testing"
)

// fakeDNS answers A queries for one name from a fixed list, on a loopback
// UDP port: enough of RFC 1035 for Go's resolver, so DNS.Discover is tested
// through real name resolution without touching the machine's DNS.
type fakeDNS struct {
	name string
	ips  []netip.Addr
	conn net.PacketConn
}

func startFakeDNS(t *testing.T, name string, ips ...netip.Addr) *fakeDNS {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &fakeDNS{name: strings.TrimSuffix(name, ".") + ".", ips: ips, conn: c}
	t.Cleanup(func() { c.Close() })
	go d.serve()
	return d
}

func (d *fakeDNS) resolver() *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var dl net.Dialer
		return dl.DialContext(ctx, "udp", d.conn.LocalAddr().String())
	}}
}

func (d *fakeDNS) serve() {
	buf := make([]byte, 512)
	for {
		n, from, err := d.conn.ReadFrom(buf)
		if err != nil {
			return
		}
		if resp := d.answer(buf[:n]); resp != nil {
			d.conn.WriteTo(resp, from)
		}
	}
}

func (d *fakeDNS) answer(q []byte) []byte {
	if len(q) < 12 || binary.BigEndian.Uint16(q[4:]) != 1 {
		return nil
	}
	// The question: labels, then type and class.
	i, labels := 12, []string{}
	for i < len(q) && q[i] != 0 {
		l := int(q[i])
		if i+1+l > len(q) {
			return nil
		}
		labels = append(labels, string(q[i+1:i+1+l]))
		i += 1 + l
	}
	if i+5 > len(q) {
		return nil
	}
	qtype := binary.BigEndian.Uint16(q[i+1:])
	question := q[12 : i+5]
	var answers [][]byte
	rcode := uint16(0)
	if !strings.EqualFold(strings.Join(labels, ".")+".", d.name) {
		rcode = 3 // NXDOMAIN
	} else if qtype == 1 { // A; AAAA gets an empty answer
		for _, ip := range d.ips {
			a := []byte{0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4}
			ip4 := ip.As4()
			answers = append(answers, append(a, ip4[:]...))
		}
	}
	resp := make([]byte, 12, 512)
	copy(resp, q[:2])
	binary.BigEndian.PutUint16(resp[2:], 0x8180|rcode)
	binary.BigEndian.PutUint16(resp[4:], 1)
	binary.BigEndian.PutUint16(resp[6:], uint16(len(answers)))
	resp = append(resp, question...)
	for _, a := range answers {
		resp = append(resp, a...)
	}
	return resp
}

func TestDNSDiscoverResolvesAName(t *testing.T) {
	a := newLibp2pHost(t, "127.0.0.1")
	b := newLibp2pHostOnPort(t, "127.0.0.2", ownTCPPort(a.Addrs()))
	c := newLibp2pHostOnPort(t, "127.0.0.3", ownTCPPort(a.Addrs()))
	if b == nil || c == nil {
		t.Skip("the port a took on 127.0.0.1 is busy on 127.0.0.2 or .3; nothing wrong with peerd")
	}
	ips := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2"),
		netip.MustParseAddr("127.0.0.3"), netip.MustParseAddr("127.0.0.4")}
	dns := startFakeDNS(t, "peerd-p2p.peerd.svc.cluster.local", ips...)

	// From a, with its own port (a DaemonSet uses one port everywhere): a
	// skips itself, finds b and c, and a dead address does not spoil the round.
	d, err := NewDNS(a, DNSOptions{Name: "peerd-p2p.peerd.svc.cluster.local", Resolver: dns.resolver(), MaxProbes: 3})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	ps, err := d.Discover(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, p := range ps {
		got[p.ID.String()] = true
	}
	if len(ps) != 2 || !got[b.ID().String()] || !got[c.ID().String()] {
		t.Fatalf("Discover = %v, want b %s and c %s", ps, b.ID(), c.ID())
	}

	// An unknown name is an error for the bootstrap loop to retry.
	d, _ = NewDNS(a, DNSOptions{Name: "nobody.peerd.svc.cluster.local", Resolver: dns.resolver()})
	if ps, err := d.Discover(ctx); err == nil {
		t.Fatalf("Discover of an unknown name = %v, want an error", ps)
	}
}

func newLibp2pHostOnPort(t *testing.T, ip string, port int) *libp2pHost {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, itoa(port)))
	if err != nil {
		return nil
	}
	ln.Close()
	h := newLibp2pHostAt(t, "/ip4/"+ip+"/tcp/"+itoa(port))
	return &h
}
