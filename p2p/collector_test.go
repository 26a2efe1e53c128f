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
	go func() { done <- collectProviders(context.Background(), ch, nil, time.Hour, 0) }()
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
