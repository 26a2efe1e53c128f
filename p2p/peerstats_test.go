package p2p

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"testing"

	"github.com/peerd-project/peerd/transfer"
)

// A node reading a blob from another sees it in Peers with the bytes read;
// the server sees the bytes served and records one transfer for the pull.
func TestPeersAndServedTransfers(t *testing.T) {
	a := startNode(t, nil)
	b := startNode(t, nil, a)
	log := transfer.NewLog(10)
	a.cfg.Transfers = log // before any request reaches a
	waitFor(t, "connected", func() bool { return b.connected(a.ID()) })
	data := make([]byte, 3<<20+5)
	rand.Read(data)
	k := a.store.put(data)
	a.Announcer("test").Holding(k)
	waitFor(t, "advertised", func() bool { return counter(t, a.reg, "peerd_p2p_provides_total", "ok") > 0 })
	for off := int64(0); off < int64(len(data)); off += 1 << 20 { // range requests, as the cache makes them
		rc, _, err := b.Source().Fetch(context.Background(), k, off, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(rc)
		rc.Close()
		if !bytes.Equal(got, data[off:min(off+1<<20, int64(len(data)))]) {
			t.Fatalf("bytes at %d differ", off)
		}
	}
	find := func(ps []PeerInfo, id string) *PeerInfo {
		for i := range ps {
			if ps[i].ID.String() == id {
				return &ps[i]
			}
		}
		return nil
	}
	if p := find(b.Peers(), a.ID().String()); p == nil || !p.Connected || p.ReadFrom != int64(len(data)) || p.Addr == "" || p.ConnectedSince.IsZero() {
		t.Fatalf("b's view of a: %+v, want connected with %d bytes read", p, len(data))
	}
	if p := find(a.Peers(), b.ID().String()); p == nil || p.ServedTo != int64(len(data)) {
		t.Fatalf("a's view of b: %+v, want %d bytes served", p, len(data))
	}
	recs := log.List()
	if len(recs) != 1 || recs[0].Face != transfer.FacePeer || recs[0].Peer != b.ID().String() || recs[0].Bytes.Cache != int64(len(data)) || recs[0].Key != string(k) {
		t.Fatalf("a's transfers %+v, want one record of %d bytes to b", recs, len(data))
	}
}
