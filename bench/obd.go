package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"
)

// obdRate is the throttled origin's speed in row 7: 1 Gbit/s, a registry
// reached over a network link rather than loopback.
const obdRate = 1_000_000_000 / 8

// obdRange is the size of each Range request in row 7, as a lazy-loading
// block device reads a layer.
const obdRange = 1 << 20

// benchOBD is row 7: an Overlaybd-style read of a blob, 1 MiB Range
// requests in order over one kept-alive connection, through a node's
// /blobs/ while the node has never seen the blob (cold) and again (warm),
// against the same ranges straight from the origin; then cold against
// direct with the origin paced to 1 Gbit/s, where the origin, not the
// node's CPU, should bound the read.
func benchOBD(ctx context.Context, c *config, t *table) error {
	size := c.obdMB << 20
	o, err := startOrigin(ctx, c, "origin-obd")
	if err != nil {
		return err
	}
	defer o.fs.Stop()
	slow, err := startPacedOrigin(ctx, c, "origin-obd-paced", obdRate)
	if err != nil {
		return err
	}
	defer slow.fs.Stop()
	n, err := startNode(ctx, c, filepath.Join(c.work, "obd"), nodeOpts{args: []string{
		"--upstream-allow", o.host() + "," + slow.host(),
		// Two new blobs a round, none evicted.
		"--cache-size", fmt.Sprintf("%dMiB", 2*int64(c.rounds+1)*c.obdMB+64),
	}})
	if err != nil {
		return err
	}
	defer n.Stop()
	settle := settleTime()
	gib := float64(size) / (1 << 30)
	var cold, warm, direct, coldSlow, directSlow, cpuCold, cpuWarm, cpuColdSlow []float64
	var extraConns int
	read := func(url string, v *float64) error {
		var conns int
		var err error
		*v, conns, err = rangesOverOneConn(ctx, url, size, obdRange)
		extraConns += conns - 1
		return err
	}
	readNode := func(url string, v, cpu *float64) error {
		var err error
		*v, *cpu, err = measured(n.PID(), func() (float64, error) {
			var x float64
			err := read(url, &x)
			return x, err
		})
		return err
	}
	for r := 0; r <= c.rounds; r++ {
		_, rel, err := writeBlob(o.dir, size)
		if err != nil {
			return err
		}
		_, relSlow, err := writeBlob(slow.dir, size)
		if err != nil {
			return err
		}
		var cf, wf, df, cs, ds, ccf, cwf, ccs float64
		runs := []func() error{
			func() error {
				if err := readNode(n.URL("/blobs/"+o.url(rel)), &cf, &ccf); err != nil {
					return err
				}
				// Warm comes right after cold, never before it; it too starts
				// with no dirty pages.
				syscall.Sync()
				if err := sleep(ctx, settle); err != nil {
					return err
				}
				return readNode(n.URL("/blobs/"+o.url(rel)), &wf, &cwf)
			},
			func() error { return read(o.url(rel), &df) },
			func() error { return readNode(n.URL("/blobs/"+slow.url(relSlow)), &cs, &ccs) },
			func() error { return read(slow.url(relSlow), &ds) },
		}
		if err := rotateRuns(ctx, settle, runs, r); err != nil {
			return err
		}
		os.Remove(filepath.Join(o.dir, rel))
		os.Remove(filepath.Join(slow.dir, relSlow))
		if r == 0 {
			t.note("row 7 warm-up round (not counted): cold %.0f, warm %.0f, direct %.0f; paced origin: cold %.0f, direct %.0f MiB/s", cf, wf, df, cs, ds)
			continue
		}
		cold, warm, direct = append(cold, cf), append(warm, wf), append(direct, df)
		coldSlow, directSlow = append(coldSlow, cs), append(directSlow, ds)
		cpuCold, cpuWarm, cpuColdSlow = append(cpuCold, ccf/gib), append(cpuWarm, cwf/gib), append(cpuColdSlow, ccs/gib)
	}
	what := fmt.Sprintf("Overlaybd-style read (%d MiB, 1 MiB ranges in order over one connection) through `/blobs/`", c.obdMB)
	rc := median(ratios(cold, direct))
	t.add(row{group: "7", what: what + ", cold (a blob the node never saw), vs the same ranges straight from the origin, loopback",
		peerd: mibs(median(cold)), baseline: mibs(median(direct)) + " origin direct", ratio: fmt.Sprintf("%.2f", rc), goal: "≥ 0.5", verdict: atLeast(rc, 0.5)})
	t.add(row{group: "7", what: what + ", warm (the same blob again), vs the origin direct",
		peerd: mibs(median(warm)), baseline: mibs(median(direct)) + " origin direct", ratio: fmt.Sprintf("%.2f", median(ratios(warm, direct)))})
	rs := median(ratios(coldSlow, directSlow))
	t.add(row{group: "7", what: what + ", cold, origin paced to 1 Gbit/s, vs the same ranges straight from it",
		peerd: mibs(median(coldSlow)), baseline: mibs(median(directSlow)) + " paced origin direct", ratio: fmt.Sprintf("%.2f", rs), goal: "≥ 0.95", verdict: atLeast(rs, 0.95)})
	t.note("row 7: the node's CPU per GiB read: cold %.2f s, warm %.2f s, cold from the paced origin %.2f s", median(cpuCold), median(cpuWarm), median(cpuColdSlow))
	if extraConns > 0 {
		t.note("row 7: the ranges of a read did not all share one connection: %d more connections than reads", extraConns)
	}
	return nil
}

// rangesOverOneConn reads size bytes of url as chunk-sized Range requests
// in order through a client holding at most one connection, and returns
// the MiB/s and how many connections it opened (1 when kept alive).
func rangesOverOneConn(ctx context.Context, url string, size, chunk int64) (float64, int, error) {
	tr := &http.Transport{
		DisableCompression:    true,
		MaxConnsPerHost:       1,
		MaxIdleConnsPerHost:   1,
		ResponseHeaderTimeout: 60 * time.Second,
		ReadBufferSize:        256 << 10,
	}
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr}
	var conns atomic.Int32
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) {
		if !i.Reused {
			conns.Add(1)
		}
	}})
	start := time.Now()
	for off := int64(0); off < size; off += chunk {
		m := min(chunk, size-off)
		if _, err := readRangeWith(ctx, cl, url, off, m, m); err != nil {
			return 0, int(conns.Load()), err
		}
	}
	return float64(size) / (1 << 20) / time.Since(start).Seconds(), int(conns.Load()), nil
}
