package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// benchFUSE is row 2: the cached blob read through the mount against the
// cache's backing file, sequentially and at random 4 KiB offsets.
func benchFUSE(ctx context.Context, c *config, t *table) error {
	if os.Geteuid() != 0 {
		t.add(row{group: "2", what: "FUSE", peerd: "skipped: needs root", verdict: "skipped"})
		return nil
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.add(row{group: "2", what: "FUSE", peerd: "skipped: no /dev/fuse", verdict: "skipped"})
		return nil
	}
	size := c.size()
	o, err := startOrigin(ctx, c, "origin-fuse")
	if err != nil {
		return err
	}
	defer o.fs.Stop()
	mnt := filepath.Join(c.work, "mnt")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return err
	}
	n, err := startNode(ctx, c, filepath.Join(c.work, "fuse"), nodeOpts{mount: mnt, args: []string{
		"--upstream-allow", o.host(),
		"--cache-size", fmt.Sprintf("%dMiB", 2*c.sizeMB+64),
	}})
	if err != nil {
		return err
	}
	defer func() {
		n.Stop()
		// A peerd that died without unmounting leaves a dead mount behind.
		syscall.Unmount(mnt, syscall.MNT_DETACH)
	}()
	hexd, rel, err := fill(ctx, n, o, size)
	if err != nil {
		return err
	}
	os.Remove(filepath.Join(o.dir, rel))
	viaMount := filepath.Join(mnt, "sha256", hexd)
	backing := cacheFile(n, hexd)

	var seqM, seqB, rndM, rndB []float64
	reads := 20000
	if c.quick {
		reads = 5000
	}
	for r := 0; r <= c.rounds; r++ {
		var sm, sb, rm, rb float64
		mountRun := func() error {
			var err error
			if sm, err = seqRead(viaMount, size); err != nil {
				return err
			}
			rm, err = randomReads(viaMount, size, reads)
			return err
		}
		backRun := func() error {
			var err error
			if sb, err = seqRead(backing, size); err != nil {
				return err
			}
			rb, err = randomReads(backing, size, reads)
			return err
		}
		first, second := mountRun, backRun
		if r%2 == 1 {
			first, second = backRun, mountRun
		}
		if err := first(); err != nil {
			return err
		}
		if err := second(); err != nil {
			return err
		}
		if r == 0 {
			continue // warm-up: first reads through a new mount and cold page cache
		}
		seqM, seqB, rndM, rndB = append(seqM, sm), append(seqB, sb), append(rndM, rm), append(rndB, rb)
	}
	// How the kernel reads the mount: straight from the cache file
	// (passthrough), or through peerd (local: spliced from the cache file).
	mode := "opens:"
	for _, m := range []string{"passthrough", "local", "lazy"} {
		if v, _ := n.metric(ctx, "peerd_fuse_opens_total", "mode="+m); v > 0 {
			mode += fmt.Sprintf(" %s %.0f", m, v)
		}
	}
	rt := median(ratios(seqM, seqB))
	t.add(row{group: "2", what: "FUSE sequential read of the cached blob (" + mode + ")", peerd: mibs(median(seqM)),
		baseline: mibs(median(seqB)) + " backing file", ratio: fmt.Sprintf("%.2f", rt), goal: "≥ 0.8", verdict: atLeast(rt, 0.8)})
	rr := median(ratios(rndM, rndB))
	t.add(row{group: "2", what: fmt.Sprintf("FUSE random 4 KiB reads (%d per run)", reads), peerd: fmt.Sprintf("%.0f /s", median(rndM)),
		baseline: fmt.Sprintf("%.0f /s backing file", median(rndB)), ratio: fmt.Sprintf("%.2f", rr)})
	return nil
}

// seqRead reads a file front to back in 1 MiB reads and returns MiB/s.
func seqRead(path string, size int64) (float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	start := time.Now()
	n, err := io.CopyBuffer(discard, struct{ io.Reader }{f}, make([]byte, 1<<20))
	if err != nil {
		return 0, err
	}
	if n != size {
		return 0, fmt.Errorf("%s: read %d bytes, want %d", path, n, size)
	}
	return float64(size) / (1 << 20) / time.Since(start).Seconds(), nil
}

// randomReads does count 4 KiB preads at aligned random offsets and returns
// reads per second.
func randomReads(path string, size int64, count int) (float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, 4096)
	blocks := size / 4096
	if blocks == 0 {
		return 0, errors.New("file smaller than 4 KiB")
	}
	rng := rand.New(rand.NewPCG(1, 2))
	start := time.Now()
	for i := 0; i < count; i++ {
		if _, err := f.ReadAt(buf, rng.Int64N(blocks)*4096); err != nil {
			return 0, err
		}
	}
	return float64(count) / time.Since(start).Seconds(), nil
}
