package p2p

import (
	"context"
	"crypto/rand"
	"io"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestCleanZoneIsBoundedAndPrintable(t *testing.T) {
	for in, want := range map[string]string{
		"eu-west-1a":             "eu-west-1a",
		" zone b ":               "zone_b",
		"z\nzone=evil":           "z_zone=evil",
		"\x00ü":                  "__",
		strings.Repeat("x", 200): strings.Repeat("x", maxZoneLen),
	} {
		if got := cleanZone(in); got != want {
			t.Errorf("cleanZone(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestSameZoneFirstKeepsOrderWithinGroups(t *testing.T) {
	var z zones
	mine := "z1"
	z.self.Store(&mine)
	ids := []peer.ID{newPeerID(t), newPeerID(t), newPeerID(t), newPeerID(t)}
	z.learn(ids[1], "z2")
	z.learn(ids[2], "z1")
	z.learn(ids[3], "z1")
	var ps []peer.AddrInfo
	for _, id := range ids {
		ps = append(ps, peer.AddrInfo{ID: id})
	}
	got := z.sameZoneFirst(ps)
	want := []peer.ID{ids[2], ids[3], ids[0], ids[1]}
	for i := range want {
		if got[i].ID != want[i] {
			t.Fatalf("order %v, want same-zone holders first, each group in its order", got)
		}
	}
	if r := z.relation(ids[1]); r != "cross" {
		t.Fatalf("relation to z2: %s", r)
	}
	if r := z.relation(ids[0]); r != "unknown" {
		t.Fatalf("relation to a peer of unknown zone: %s", r)
	}
}

// Real nodes: once an asker knows its holders' zones, every chunk comes
// from the holder in its own zone, whatever the spread would pick.
func TestReadsPreferTheSameZone(t *testing.T) {
	a := startNode(t, nil)
	b := startNode(t, nil, a)
	c := startNode(t, nil, a)
	a.SetZone("z1")
	b.SetZone("z2")
	c.SetZone("z1")
	data := make([]byte, 16<<20)
	rand.Read(data)
	k := a.store.put(data)
	b.store.put(data)
	for _, n := range []*testNode{b, c} {
		waitFor(t, "routing table", func() bool { return n.RoutingTableSize() > 0 })
	}
	a.Announcer("test").Holding(k)
	b.Announcer("test").Holding(k)
	for _, h := range []*testNode{a, b} {
		waitFor(t, "advertised", func() bool { return counter(t, h.reg, "peerd_p2p_provides_total", "ok") > 0 })
	}
	read := func(off int64) {
		rc, _, err := c.Source().Fetch(context.Background(), k, off, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, rc)
		rc.Close()
	}
	waitForProviders(t, c, k, 2)
	waitFor(t, "c knows both holders' zones", func() bool {
		read(0) // asks the zones of holders it does not know yet
		return c.zones.of(a.ID()) == "z1" && c.zones.of(b.ID()) == "z2"
	})
	crossBefore := testutil.ToFloat64(c.m.receivedByZone.WithLabelValues("cross"))
	sameBefore := testutil.ToFloat64(c.m.receivedByZone.WithLabelValues("same"))
	for off := int64(0); off < int64(len(data)); off += 1 << 20 {
		read(off)
	}
	cross := testutil.ToFloat64(c.m.receivedByZone.WithLabelValues("cross")) - crossBefore
	same := testutil.ToFloat64(c.m.receivedByZone.WithLabelValues("same")) - sameBefore
	if cross != 0 || same != float64(len(data)) {
		t.Fatalf("16 chunks: %v bytes from the same zone, %v across; want all %d from the same zone", same, cross, len(data))
	}
	// The holder counts what it served by the asker's zone (told per request).
	if got := testutil.ToFloat64(a.m.servedByZone.WithLabelValues("same")); got < float64(len(data)) {
		t.Fatalf("a served %v bytes to its own zone, want at least %d", got, len(data))
	}
	// The debug page's totals agree with the metrics.
	if zb := c.ZoneBytes(); float64(zb.ReceivedSame) != testutil.ToFloat64(c.m.receivedByZone.WithLabelValues("same")) ||
		float64(zb.ReceivedCross) != testutil.ToFloat64(c.m.receivedByZone.WithLabelValues("cross")) || zb.ServedSame+zb.ServedCross != 0 {
		t.Fatalf("c's zone bytes %+v disagree with its metrics", zb)
	}
	if zb := a.ZoneBytes(); float64(zb.ServedSame) != testutil.ToFloat64(a.m.servedByZone.WithLabelValues("same")) || zb.ServedSame < int64(len(data)) {
		t.Fatalf("a's zone bytes %+v disagree with its metrics", zb)
	}
}

// A node with a zone asks a peer's zone as soon as the peer connects, so
// a rollout's first chunks already know which holders share its zone.
func TestZoneIsLearnedWhenAPeerConnects(t *testing.T) {
	a := startNode(t, nil)
	a.SetZone("z1")
	b := startNode(t, nil)
	b.SetZone("z2")
	if err := b.Connect(context.Background(), peer.AddrInfo{ID: a.ID(), Addrs: a.Host().Addrs()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b learns a's zone without reading anything", func() bool { return b.zones.of(a.ID()) == "z1" })
}
