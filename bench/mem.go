package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
)

// benchMemory is row 6: RSS of one peerd idle, and its peak while serving
// concurrent range streams of a cached blob, next to http.FileServer under
// the same load.
func benchMemory(ctx context.Context, c *config, t *table) error {
	size := min(c.size(), 256<<20)
	o, err := startOrigin(ctx, c, "origin-mem")
	if err != nil {
		return err
	}
	defer o.fs.Stop()
	n, err := startNode(ctx, c, filepath.Join(c.work, "mem"), nodeOpts{args: []string{
		"--upstream-allow", o.host(), "--cache-size", "1GiB",
	}})
	if err != nil {
		return err
	}
	defer n.Stop()
	plain, err := startFileServer(ctx, n.IP, filepath.Join(n.DataDir, "cache", "blobs", "sha256"))
	if err != nil {
		return err
	}
	defer plain.Stop()
	if err := sleep(ctx, 5*time.Second); err != nil { // let start-up garbage be collected
		return err
	}
	idle, err := rssMiB(n.PID(), "VmRSS")
	if err != nil {
		return err
	}
	idlePlain, err := rssMiB(plain.PID(), "VmRSS")
	if err != nil {
		return err
	}
	t.add(row{group: "6", what: "memory: RSS idle (" + rssParts(n.PID()) + ")", peerd: fmt.Sprintf("%.1f MiB", idle),
		baseline: fmt.Sprintf("%.1f MiB FileServer", idlePlain), goal: "≤ 64 MiB", verdict: atMost(idle, 64)})

	hexd, rel, err := fill(ctx, n, o, size)
	if err != nil {
		return err
	}
	os.Remove(filepath.Join(o.dir, rel))
	dur := 10 * time.Second
	if c.quick {
		dur = 4 * time.Second
	}
	peakP, thrP, err := underLoad(ctx, n.PID(), n.URL("/blobs/"+o.url(rel)), size, c.streams, dur)
	if err != nil {
		return err
	}
	peakF, thrF, err := underLoad(ctx, plain.PID(), plain.URL+"/"+hexd+"/data", size, c.streams, dur)
	if err != nil {
		return err
	}
	t.add(row{group: "6", what: fmt.Sprintf("memory: peak RSS serving %d concurrent 1 MiB range streams (%s, %s)", c.streams, mibs(thrP), mibs(thrF)),
		peerd: fmt.Sprintf("%.1f MiB", peakP), baseline: fmt.Sprintf("%.1f MiB FileServer", peakF),
		ratio: fmt.Sprintf("%.2f", thrP/thrF) + " (MiB/s)", goal: "≤ 150 MiB", verdict: atMost(peakP, 150)})
	return nil
}

// underLoad runs streams readers of random 1 MiB ranges of url for d and
// samples pid's RSS; it returns the peak RSS and the total MiB/s.
func underLoad(ctx context.Context, pid int, url string, size int64, streams int, d time.Duration) (float64, float64, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var read atomic.Int64
	var wg sync.WaitGroup
	var errOnce sync.Once
	var firstErr error
	chunks := size >> 20
	for i := 0; i < streams; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 7))
			for ctx.Err() == nil {
				off := rng.Int64N(chunks) << 20
				n, err := readRange(ctx, url, off, 1<<20, 1<<20)
				read.Add(n)
				if err != nil && ctx.Err() == nil {
					errOnce.Do(func() { firstErr = err; cancel() })
				}
			}
		}()
	}
	start := time.Now()
	var peak float64
	tick := time.NewTicker(100 * time.Millisecond)
	for ctx.Err() == nil {
		select {
		case <-tick.C:
			if v, err := rssMiB(pid, "VmRSS"); err == nil && v > peak {
				peak = v
			}
		case <-ctx.Done():
		}
	}
	tick.Stop()
	wg.Wait()
	if firstErr != nil {
		return 0, 0, firstErr
	}
	return peak, float64(read.Load()) / (1 << 20) / time.Since(start).Seconds(), nil
}
