package p2p

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
)

// BenchmarkFindProviders measures DHT discovery in a network of
// PEERD_BENCH_NODES (default 20) in-process nodes on loopback: the time to
// the first provider of an advertised blob, the time a lookup for a blob
// nobody holds takes to give up, and the finder's whole lookup as swarm and
// background lookups make it (collecting for 2 ms after the first provider).
// Run:
// go test -run '^$' -bench FindProviders -benchtime 1x ./p2p/
func BenchmarkFindProviders(b *testing.B) {
	nodes := 20
	if v := os.Getenv("PEERD_BENCH_NODES"); v != "" {
		nodes, _ = strconv.Atoi(v)
	}
	const keys = 100
	var ns []*testNode
	first := startNode(b, nil)
	ns = append(ns, first)
	for i := 1; i < nodes; i++ {
		ns = append(ns, startNode(b, nil, first))
	}
	for _, n := range ns {
		waitFor(b, "routing tables", func() bool { return n.RoutingTableSize() >= min(nodes-1, 5) })
	}
	ks := make([]blob.Key, keys)
	holder := make([]int, keys)
	for i := range ks {
		var r [32]byte
		rand.Read(r[:])
		sum := sha256.Sum256(r[:])
		ks[i] = blob.Key("sha256:" + hex.EncodeToString(sum[:]))
		holder[i] = mrand.IntN(nodes)
		ns[holder[i]].Announcer("test").Holding(ks[i])
	}
	start := time.Now()
	waitFor(b, "all advertised", func() bool {
		var sum float64
		for _, n := range ns {
			sum += counter(b, n.reg, "peerd_p2p_provides_total", "ok")
		}
		return sum >= keys
	})
	advertiseAll := time.Since(start)

	b.ResetTimer()
	var firstLat, missLat, sourceLat []time.Duration
	for i, k := range ks {
		asker := ns[(holder[i]+1+mrand.IntN(nodes-1))%nodes]
		c, _ := KeyToCID(k)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		t0 := time.Now()
		ch := asker.dht.FindProvidersAsync(ctx, c, 1)
		if _, ok := <-ch; ok {
			firstLat = append(firstLat, time.Since(t0))
		} else {
			b.Errorf("no provider found for %s", k)
		}
		cancel()
		for range ch {
		}

		t0 = time.Now()
		if ps, _ := (&dhtFinder{n: asker.Node}).FindProviders(context.Background(), k, nil); len(ps) > 0 {
			sourceLat = append(sourceLat, time.Since(t0))
		}

		var r [32]byte
		rand.Read(r[:])
		sum := sha256.Sum256(r[:])
		missing, _ := KeyToCID(blob.Key("sha256:" + hex.EncodeToString(sum[:])))
		ctx, cancel = context.WithTimeout(context.Background(), 2*time.Second)
		t0 = time.Now()
		for range asker.dht.FindProvidersAsync(ctx, missing, 1) {
		}
		missLat = append(missLat, time.Since(t0))
		cancel()
	}
	q := func(d []time.Duration, p float64) time.Duration {
		if len(d) == 0 {
			return 0
		}
		s := slices.Clone(d)
		slices.Sort(s)
		return s[int(float64(len(s)-1)*p)]
	}
	fmt.Printf("\nDHT discovery, %d nodes in one process, %d blobs (advertising all took %v)\n", nodes, keys, advertiseAll.Round(time.Millisecond))
	fmt.Printf("  first provider       p50 %-10v p99 %v\n", q(firstLat, .5), q(firstLat, .99))
	fmt.Printf("  finder, whole lookup p50 %-10v p99 %v\n", q(sourceLat, .5), q(sourceLat, .99))
	fmt.Printf("  nobody has it        p50 %-10v p99 %v\n", q(missLat, .5), q(missLat, .99))
	b.ReportMetric(float64(q(firstLat, .5).Microseconds()), "first-p50-µs")
	b.ReportMetric(float64(q(firstLat, .99).Microseconds()), "first-p99-µs")
	b.ReportMetric(float64(q(missLat, .5).Microseconds()), "miss-p50-µs")
	b.ReportMetric(float64(q(missLat, .99).Microseconds()), "miss-p99-µs")
}
