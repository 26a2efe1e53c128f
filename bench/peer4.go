package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// peer4Readers is how many nodes read from A at once in row 3b.
const peer4Readers = 4

// benchPeer4 is row 3b: node A serves a blob it holds to 4 new nodes that
// read it through their /blobs/ at the same moment, against the plain file
// server on A's address serving A's data file to 4 concurrent downloads
// (saved to disk and fsynced: the fair one, as each reader's cache keeps
// the bytes; and thrown away).
func benchPeer4(ctx context.Context, c *config, t *table) error {
	size := c.size()
	s, err := startPeerSetup(ctx, c, "peer4")
	if err != nil {
		return err
	}
	defer s.Stop()
	o, a, plain := s.o, s.a, s.plain
	keepDir := filepath.Join(c.work, "peer4-downloads")
	if err := os.MkdirAll(keepDir, 0o755); err != nil {
		return err
	}
	var peer, kept, discarded, cpuA, cpuServer []float64
	// Bytes of the counted rounds: what the readers asked for, what A's
	// peer server sent, what the readers received from any peer.
	var want, served, received float64
	gib := float64(peer4Readers*size) / (1 << 30)
	// Each run deletes what it wrote as soon as it is measured, so at most
	// 4 blobs' worth of readers' data exists at a time, and every run starts
	// with as much free memory as the others.
	var bs []*node
	stopReaders := func() {
		for _, b := range bs {
			b.Stop()
			os.RemoveAll(b.DataDir)
		}
		bs = nil
	}
	defer stopReaders()
	for r := 0; r <= c.rounds; r++ {
		// A advertises only with a peer in its routing table: readers first.
		for i := range peer4Readers {
			b, err := s.startB(ctx, fmt.Sprintf("peer4-b%d-%d", r, i+1))
			if err != nil {
				return err
			}
			bs = append(bs, b)
		}
		hexd, rel, err := s.fillA(ctx, size)
		if err != nil {
			return err
		}
		plainURL := plain.URL + "/" + hexd + "/data"
		var p, k, d, ca, ck, sent, recv float64
		runs := []func() error{
			func() error {
				served0, err := a.metric(ctx, "peerd_p2p_served_bytes_total")
				if err != nil {
					return err
				}
				recv0 := make([]float64, len(bs))
				for i, b := range bs {
					if recv0[i], err = b.metric(ctx, "peerd_p2p_received_bytes_total"); err != nil {
						return err
					}
				}
				if p, ca, err = measured(a.PID(), func() (float64, error) {
					return together(ctx, peer4Readers, size, func(ctx context.Context, i int) error {
						_, err := readRange(ctx, bs[i].URL("/blobs/"+o.url(rel)), 0, 0, size)
						return err
					})
				}); err != nil {
					return err
				}
				served1, err := a.metric(ctx, "peerd_p2p_served_bytes_total")
				if err != nil {
					return err
				}
				sent = served1 - served0
				for i, b := range bs {
					v, err := b.metric(ctx, "peerd_p2p_received_bytes_total")
					if err != nil {
						return err
					}
					recv += v - recv0[i]
				}
				stopReaders()
				return nil
			},
			func() error {
				var err error
				k, ck, err = measured(plain.PID(), func() (float64, error) {
					return together(ctx, peer4Readers, size, func(ctx context.Context, i int) error {
						_, err := downloadToFile(ctx, plainURL, filepath.Join(keepDir, fmt.Sprintf("%s-%d", hexd, i)), size)
						return err
					})
				})
				for i := range peer4Readers {
					os.Remove(filepath.Join(keepDir, fmt.Sprintf("%s-%d", hexd, i)))
				}
				return err
			},
			func() error {
				var err error
				d, err = together(ctx, peer4Readers, size, func(ctx context.Context, i int) error {
					_, err := readRange(ctx, plainURL, 0, 0, size)
					return err
				})
				return err
			},
		}
		if err := rotateRuns(ctx, s.settle, runs, r); err != nil {
			return err
		}
		os.Remove(filepath.Join(o.dir, rel))
		if r == 0 {
			t.note("row 3b warm-up round (not counted): A to 4 readers %.0f, plain downloads kept %.0f, discarded %.0f MiB/s (aggregate)", p, k, d)
			continue
		}
		peer, kept, discarded = append(peer, p), append(kept, k), append(discarded, d)
		cpuA, cpuServer = append(cpuA, ca/gib), append(cpuServer, ck/gib)
		want += float64(peer4Readers * size)
		served += sent
		received += recv
	}
	rk := median(ratios(peer, kept))
	t.add(row{group: "3b", what: "one node serving 4 peers at once (4 new nodes read a blob A holds through their `/blobs/`, all together), aggregate, vs 4 concurrent plain downloads from A saved to disk",
		peerd: mibs(median(peer)), baseline: mibs(median(kept)) + " plain HTTP ×4 → file + fsync", ratio: fmt.Sprintf("%.2f", rk), goal: "≥ 0.8", verdict: atLeast(rk, 0.8)})
	t.add(row{group: "3b", what: "one node serving 4 peers, vs the 4 plain downloads thrown away",
		peerd: mibs(median(peer)), baseline: mibs(median(discarded)) + " plain HTTP ×4 → /dev/null", ratio: fmt.Sprintf("%.2f", median(ratios(peer, discarded)))})
	t.add(row{group: "3b", what: "one node serving 4 peers: A's CPU per GiB served vs the file server's (downloads saved to disk)",
		peerd: fmt.Sprintf("%.2f s", median(cpuA)), baseline: fmt.Sprintf("%.2f s", median(cpuServer)), ratio: fmt.Sprintf("%.2f", median(ratios(cpuA, cpuServer)))})
	if want > 0 && served < 0.99*want {
		t.note("row 3b: A's peer server sent %.1f%% of the readers' bytes; the readers received %.1f%% from peers (A and each other) and %.1f%% from the origin",
			100*served/want, 100*received/want, 100*max(0, want-received)/want)
	}
	return nil
}

// together runs f for i in [0, n) at the same moment and returns the
// aggregate MiB/s of n × size bytes over the time until the last one
// finished. The first error cancels the others.
func together(ctx context.Context, n int, size int64, f func(ctx context.Context, i int) error) (float64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var once sync.Once
	var first error // the others' errors are the cancellation it caused
	gate := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-gate
			if err := f(ctx, i); err != nil {
				once.Do(func() { first = err })
				cancel()
			}
		})
	}
	start := time.Now()
	close(gate)
	wg.Wait()
	el := time.Since(start)
	if first != nil {
		return 0, first
	}
	return float64(int64(n)*size) / (1 << 20) / el.Seconds(), nil
}
