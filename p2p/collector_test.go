package p2p

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// A collector without a gap bound (tag lookups) keeps collecting across a
// pause between providers until its grace ends or the query is over.
func TestCollectProvidersWithoutGapWaitsOutPauses(t *testing.T) {
	ch := make(chan peer.AddrInfo)
	done := make(chan []peer.AddrInfo, 1)
	go func() { done <- collectProviders(context.Background(), ch, "", nil, time.Hour, 0) }()
	ch <- peer.AddrInfo{ID: "a"}
	time.Sleep(20 * time.Millisecond) // a pause no gap bound would survive at 0
	select {
	case ch <- peer.AddrInfo{ID: "b"}:
	case got := <-done:
		t.Fatalf("collector stopped at the pause with %v", got)
	}
	close(ch)
	select {
	case got := <-done:
		if len(got) != 2 {
			t.Fatalf("collected %v, want both providers", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("collector did not return when the query ended")
	}
}

// The node's own record (handed out first by the DHT when this node
// advertised a pull) is dropped and starts no grace: a holder answering
// after the grace still makes the list.
func TestCollectProvidersIgnoresSelf(t *testing.T) {
	ch := make(chan peer.AddrInfo)
	done := make(chan []peer.AddrInfo, 1)
	var firsts [][]peer.AddrInfo
	go func() {
		done <- collectProviders(context.Background(), ch, "self", func(ps []peer.AddrInfo) { firsts = append(firsts, ps) }, 20*time.Millisecond, 5*time.Millisecond)
	}()
	ch <- peer.AddrInfo{ID: "self"}
	time.Sleep(100 * time.Millisecond) // past grace and gap counted from the own record
	select {
	case ch <- peer.AddrInfo{ID: "holder"}:
	case got := <-done:
		t.Fatalf("collector stopped on its own record with %v", got)
	}
	close(ch)
	select {
	case got := <-done:
		if len(got) != 1 || got[0].ID != "holder" {
			t.Fatalf("collected %v, want only the holder", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("collector did not return when the query ended")
	}
	if len(firsts) != 1 || len(firsts[0]) != 1 || firsts[0][0].ID != "holder" {
		t.Fatalf("first called with %v, want the holder once", firsts)
	}
}
