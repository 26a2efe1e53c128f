package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// benchPeer is rows 3 and 4 on a two-node network: B reads a blob only A
// holds (mutually authenticated TLS between them), against a plain HTTP
// download of A's copy of the file from A's address; then the time to first
// byte of blobs nobody holds, through B and straight from the origin.
func benchPeer(ctx context.Context, c *config, t *table) error {
	size := c.size()
	o, err := startOrigin(ctx, c, "origin-peer")
	if err != nil {
		return err
	}
	defer o.fs.Stop()
	common := []string{"--upstream-allow", o.host(), "--cache-size", fmt.Sprintf("%dMiB", int64(c.rounds+2)*c.sizeMB+64)}
	a, err := startNode(ctx, c, filepath.Join(c.work, "peer-a"), nodeOpts{args: common})
	if err != nil {
		return err
	}
	defer a.Stop()
	b, err := startNode(ctx, c, filepath.Join(c.work, "peer-b"), nodeOpts{args: append(common, "--bootstrap", a.P2PAddr)})
	if err != nil {
		return err
	}
	defer b.Stop()
	if err := b.waitReady(ctx, 30*time.Second); err != nil {
		return err
	}
	if err := a.waitMetric(ctx, 1, 30*time.Second, "peerd_p2p_connected_peers"); err != nil {
		return err
	}
	plain, err := startFileServer(ctx, a.IP, filepath.Join(a.DataDir, "cache", "blobs", "sha256"))
	if err != nil {
		return err
	}
	defer plain.Stop()

	var peer, base []float64
	var fromPeers, total float64
	for r := 0; r <= c.rounds; r++ {
		provided, err := a.metric(ctx, "peerd_p2p_provides_total", "result=ok")
		if err != nil {
			return err
		}
		hexd, rel, err := fill(ctx, a, o, size)
		if err != nil {
			return err
		}
		if err := a.waitMetric(ctx, provided+1, time.Minute, "peerd_p2p_provides_total", "result=ok"); err != nil {
			return err
		}
		recv0, _ := b.metric(ctx, "peerd_p2p_received_bytes_total")
		var p, pl float64
		peerRun := func() error {
			if c.pprof != "" && r == 1 {
				done := make(chan error, 2)
				go func() { done <- a.profile(ctx, 2, filepath.Join(c.pprof, "peer-a.pprof")) }()
				go func() { done <- b.profile(ctx, 2, filepath.Join(c.pprof, "peer-b.pprof")) }()
				defer func() {
					for range 2 {
						if err := <-done; err != nil {
							t.note("profile of row 3: %v", err)
						}
					}
				}()
			}
			var err error
			p, err = download(ctx, b.URL("/blobs/"+o.url(rel)), size, 0)
			return err
		}
		plainRun := func() error {
			var err error
			pl, err = download(ctx, plain.URL+"/"+hexd+"/data", size, 0)
			return err
		}
		first, second := peerRun, plainRun
		if r%2 == 1 {
			first, second = plainRun, peerRun
		}
		if err := first(); err != nil {
			return err
		}
		if err := second(); err != nil {
			return err
		}
		recv1, _ := b.metric(ctx, "peerd_p2p_received_bytes_total")
		os.Remove(filepath.Join(o.dir, rel))
		if r == 0 {
			t.note("row 3 warm-up round (not counted): B from A %.0f, plain download %.0f MiB/s", p, pl)
			continue
		}
		peer, base = append(peer, p), append(base, pl)
		fromPeers += recv1 - recv0
		total += float64(size)
	}
	rt := median(ratios(peer, base))
	t.add(row{group: "3", what: "peer transfer: B reads a blob A holds (mTLS), one GET at B", peerd: mibs(median(peer)),
		baseline: mibs(median(base)) + " plain HTTP from A", ratio: fmt.Sprintf("%.2f", rt), goal: "≥ 0.8", verdict: atLeast(rt, 0.8)})
	if total > 0 && fromPeers < 0.99*total {
		t.note("row 3: only %.1f%% of B's bytes came from A", 100*fromPeers/total)
	}
	return benchMiss(ctx, c, t, o, b)
}

// benchMiss is row 4: time to first byte of blobs nobody holds, through
// node n (its DHT lookup finds no provider, then the origin) and straight
// from the origin, alternating.
func benchMiss(ctx context.Context, c *config, t *table, o *origin, n *node) error {
	const size = 256 << 10
	count := 200
	if c.quick {
		count = 60
	}
	var direct, through, added []time.Duration
	for i := 0; i < count; i++ {
		_, rel, err := writeBlob(o.dir, size)
		if err != nil {
			return err
		}
		var d, p time.Duration
		dRun := func() error { var err error; d, err = ttfb(ctx, o.url(rel), size); return err }
		pRun := func() error { var err error; p, err = ttfb(ctx, n.URL("/blobs/"+o.url(rel)), size); return err }
		first, second := dRun, pRun
		if i%2 == 1 {
			first, second = pRun, dRun
		}
		if err := first(); err != nil {
			return err
		}
		if err := second(); err != nil {
			return err
		}
		os.Remove(filepath.Join(o.dir, rel))
		direct, through, added = append(direct, d), append(through, p), append(added, p-d)
	}
	for _, q := range []struct {
		name string
		p    float64
	}{{"p50", .5}, {"p99", .99}} {
		add := quantile(added, q.p)
		t.add(row{group: "4", what: fmt.Sprintf("miss: time to first byte %s (%d blobs, 2 nodes, DHT lookup finds nobody)", q.name, count),
			peerd: ms(quantile(through, q.p)), baseline: ms(quantile(direct, q.p)) + " origin direct",
			ratio: "+" + ms(add), goal: "added ≤ 20 ms", verdict: atMost(float64(add)/float64(time.Millisecond), 20)})
	}
	return nil
}
