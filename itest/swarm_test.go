package itest

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// swarmRound starts n nodes, lets them all read the same /blobs/ file from a
// slow origin at once, and returns the bytes the origin sent and the bytes the
// nodes served each other.
func swarmRound(t *testing.T, n int, size int, extra ...string) (sent int64, served float64) {
	t.Helper()
	origin := NewOrigin(t, "")
	// Every answer takes a while, as from a registry across a WAN: the reads
	// overlap, which is the cold burst.
	origin.Delay.Store(int64(100 * time.Millisecond))
	data, dg := RandomBlob(t, size)
	url := origin.Put(storagePath(dg), data)

	args := append([]string{"--upstream-allow=" + origin.Host, "--chunk-size", "1MiB"}, extra...)
	first := startP2PNode(t, args...)
	nodes := []*p2pNode{first}
	for i := 1; i < n; i++ {
		nodes = append(nodes, startP2PNode(t, append(args, "--bootstrap", first.P2PAddr)...))
	}
	for _, nd := range nodes {
		waitReady(t, nd.Node)
		waitMetric(t, nd.Node, "peerd_p2p_connected_peers", float64(n-1))
	}

	var wg sync.WaitGroup
	errs := make([]error, n)
	start := make(chan struct{})
	for i, nd := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			code, _, body := Get(t, "GET", nd.URL("/blobs/"+url), nil)
			if code != 200 || Digest(body) != dg {
				errs[i] = fmt.Errorf("%s: status %d, %d bytes, digest %s, want %s", nd.Name, code, len(body), Digest(body), dg)
			}
		}()
	}
	close(start)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, nd := range nodes {
		served += nd.Metric(t, "peerd_p2p_served_bytes_total")
	}
	return origin.Sent.Load(), served
}

// TestSwarmColdBurstCostsTheOriginAboutOneCopy: N nodes read the same file
// through /blobs/ at the same moment, nobody holding any of it. Each chunk is
// fetched from the origin by its rendezvous owner and read from it by the
// others, so the origin sends the file about once, not N times.
func TestSwarmColdBurstCostsTheOriginAboutOneCopy(t *testing.T) {
	const n, size = 4, 40<<20 + 4321
	// The same burst with the waiting turned off, for comparison: owners
	// answer "don't have" for chunks still on their way.
	baseSent, _ := swarmRound(t, n, size, "--swarm-wait=0")
	sent, served := swarmRound(t, n, size)
	t.Logf("%d nodes, %d MiB file: origin sent %.2f× the file (without waiting for in-flight chunks: %.2f×); peers served each other %.2f×",
		n, size>>20, float64(sent)/size, float64(baseSent)/size, served/size)
	if float64(sent) > 1.25*size {
		t.Fatalf("origin sent %d bytes for a %d-byte file read by %d nodes at once: %.2f×, want ≤ 1.25×", sent, size, n, float64(sent)/size)
	}
	// Every node but the owners of a chunk got it from a peer.
	if served < float64(n-2)*size {
		t.Fatalf("peers served each other %.0f bytes, want ≥ %d", served, (n-2)*size)
	}
}
