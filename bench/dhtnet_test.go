package main

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// TestMain lets the test binary be the child process of a split network
// (startRemotePart runs this executable with "dht-host").
func TestMain(m *testing.M) {
	if len(os.Args) == 2 && os.Args[1] == "dht-host" {
		os.Exit(runDHTHost())
	}
	os.Exit(m.Run())
}

// A network larger than one process's share is split: the nodes of the
// child process join the same DHT, advertise what they are given to hold,
// and a node of this process finds them as providers.
func TestNetworkSpansProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a child process with libp2p nodes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := &config{work: t.TempDir(), dhtPerProcess: 12, dhtResolve: 20 * time.Millisecond}
	const n = 16
	net, err := startNet(ctx, c, "peerd", 3, n)
	if err != nil {
		t.Fatal(err)
	}
	defer net.close()
	if got := net.localSize(); got != 12 {
		t.Fatalf("nodes in this process: %d, want 12", got)
	}
	if len(net.parts) != 2 || net.size() != n {
		t.Fatalf("parts %d, size %d: want 2 parts of 16 nodes", len(net.parts), net.size())
	}
	if err := net.refresh(ctx); err != nil {
		t.Fatal(err)
	}
	sz, err := net.sizes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(sz) != n {
		t.Fatalf("%d routing tables reported, want %d", len(sz), n)
	}
	// Node 14 lives in the child.
	kc := keyCase{k: randomKey(), holders: []int{14}}
	if expected, err := net.provide(ctx, []keyCase{kc}); err != nil || expected != 1 {
		t.Fatalf("provide: %d, %v", expected, err)
	}
	ps := net.local.pn[3].n.Source().Providers(ctx, kc.k)
	var ids []peer.ID
	for _, p := range ps {
		ids = append(ids, p.ID)
	}
	holder, err := peer.AddrInfoFromString(net.addrs[14])
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != 1 || ids[0] != holder.ID {
		t.Fatalf("providers of a key node 14 (%s) holds: %v", holder.ID, ids)
	}
	// And it serves the key: a fetch through the DHT reads its byte.
	rc, _, err := net.local.pn[3].n.Source().Fetch(ctx, kc.k, 0, 1)
	if err != nil {
		t.Fatalf("fetch from the child's node: %v", err)
	}
	rc.Close()
	mem, fds, err := net.usage(ctx)
	if err != nil || mem <= 0 || fds == 0 {
		t.Fatalf("memory per node %v, descriptors %d, %v", mem, fds, err)
	}
}
