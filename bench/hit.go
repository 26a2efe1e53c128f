package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// origin is a plain file server holding the blobs nodes fill from.
type origin struct {
	dir string
	fs  *fileServer
}

func startOrigin(ctx context.Context, c *config, name string) (*origin, error) {
	return startPacedOrigin(ctx, c, name, 0)
}

// startPacedOrigin starts an origin whose responses go out at most rate
// bytes per second in all (0: no limit).
func startPacedOrigin(ctx context.Context, c *config, name string, rate int64) (*origin, error) {
	dir := filepath.Join(c.work, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	fs, err := startPacedFileServer(ctx, "127.0.0.1", dir, rate)
	if err != nil {
		return nil, err
	}
	return &origin{dir: dir, fs: fs}, nil
}

func (o *origin) host() string { return strings.TrimPrefix(o.fs.URL, "http://") }

// url of a blob as a registry's storage redirect would name it.
func (o *origin) url(rel string) string { return o.fs.URL + "/" + rel }

// fill makes n fetch a whole new blob from the origin and waits until the
// cache verified it; it returns the digest hex.
func fill(ctx context.Context, n *node, o *origin, size int64) (string, string, error) {
	hexd, rel, err := writeBlob(o.dir, size)
	if err != nil {
		return "", "", err
	}
	before, err := n.metric(ctx, "peerd_cache_verifications_total", "result=ok")
	if err != nil {
		return "", "", err
	}
	if _, err := readRange(ctx, n.URL("/blobs/"+o.url(rel)), 0, 0, size); err != nil {
		return "", "", err
	}
	if err := n.waitMetric(ctx, before+1, time.Minute, "peerd_cache_verifications_total", "result=ok"); err != nil {
		return "", "", err
	}
	return hexd, rel, nil
}

// measured runs f and returns its MiB/s and the CPU seconds pid spent.
func measured(pid int, f func() (float64, error)) (float64, float64, error) {
	c0, err := cpuSeconds(pid)
	if err != nil {
		return 0, 0, err
	}
	v, err := f()
	if err != nil {
		return 0, 0, err
	}
	c1, err := cpuSeconds(pid)
	return v, c1 - c0, err
}

// benchHit is row 1: a cached, verified blob served through /blobs/ and
// /v2/, against http.FileServer serving the cache's own data file.
func benchHit(ctx context.Context, c *config, t *table) error {
	size := c.size()
	o, err := startOrigin(ctx, c, "origin-hit")
	if err != nil {
		return err
	}
	defer o.fs.Stop()
	n, err := startNode(ctx, c, filepath.Join(c.work, "hit"), nodeOpts{args: []string{
		"--upstream-allow", o.host(),
		"--cache-size", fmt.Sprintf("%dMiB", int64(c.rounds+2)*c.sizeMB+64),
	}})
	if err != nil {
		return err
	}
	defer n.Stop()
	// The baseline serves the node's cache folder: the very same file, on
	// the node's own address.
	plain, err := startFileServer(ctx, n.IP, filepath.Join(n.DataDir, "cache", "blobs", "sha256"))
	if err != nil {
		return err
	}
	defer plain.Stop()

	type series struct{ peerd, plain, cpuPeerd, cpuPlain []float64 }
	var whole, ranged, v2 series
	gib := float64(size) / (1 << 30)
	for r := 0; r <= c.rounds; r++ {
		hexd, rel, err := fill(ctx, n, o, size)
		if err != nil {
			return err
		}
		os.Remove(filepath.Join(o.dir, rel)) // only the cache holds it now
		blobsURL := n.URL("/blobs/" + o.url(rel))
		v2URL := n.URL("/v2/bench/blobs/sha256:" + hexd)
		plainURL := plain.URL + "/" + hexd + "/data"

		var pw, pr, pv, bw, br, cw, cr, cv, fw, fr float64
		peerdRuns := func() error {
			var err error
			if c.pprof != "" && r == 1 {
				done := make(chan error, 1)
				go func() { done <- n.profile(ctx, 2, filepath.Join(c.pprof, "hit-blobs.pprof")) }()
				defer func() {
					if err := <-done; err != nil {
						t.note("profile of row 1: %v", err)
					}
				}()
			}
			if pw, cw, err = measured(n.PID(), func() (float64, error) { return download(ctx, blobsURL, size, 0) }); err != nil {
				return err
			}
			if pr, cr, err = measured(n.PID(), func() (float64, error) { return download(ctx, blobsURL, size, 1<<20) }); err != nil {
				return err
			}
			pv, cv, err = measured(n.PID(), func() (float64, error) { return download(ctx, v2URL, size, 0) })
			return err
		}
		plainRuns := func() error {
			var err error
			if bw, fw, err = measured(plain.PID(), func() (float64, error) { return download(ctx, plainURL, size, 0) }); err != nil {
				return err
			}
			br, fr, err = measured(plain.PID(), func() (float64, error) { return download(ctx, plainURL, size, 1<<20) })
			return err
		}
		// Alternate the order so a burst of load from elsewhere hits both.
		first, second := peerdRuns, plainRuns
		if r%2 == 1 {
			first, second = plainRuns, peerdRuns
		}
		if err := first(); err != nil {
			return err
		}
		if err := second(); err != nil {
			return err
		}
		if r == 0 {
			t.note("row 1 warm-up round (not counted): /blobs/ %.0f, file server %.0f MiB/s", pw, bw)
			continue
		}
		whole.peerd, whole.plain = append(whole.peerd, pw), append(whole.plain, bw)
		whole.cpuPeerd, whole.cpuPlain = append(whole.cpuPeerd, cw/gib), append(whole.cpuPlain, fw/gib)
		ranged.peerd, ranged.plain = append(ranged.peerd, pr), append(ranged.plain, br)
		ranged.cpuPeerd, ranged.cpuPlain = append(ranged.cpuPeerd, cr/gib), append(ranged.cpuPlain, fr/gib)
		v2.peerd, v2.plain = append(v2.peerd, pv), append(v2.plain, bw)
		v2.cpuPeerd, v2.cpuPlain = append(v2.cpuPeerd, cv/gib), append(v2.cpuPlain, fw/gib)
	}
	add := func(what string, s series) {
		rt := median(ratios(s.peerd, s.plain))
		t.add(row{group: "1", what: what + " throughput", peerd: mibs(median(s.peerd)), baseline: mibs(median(s.plain)) + " FileServer",
			ratio: fmt.Sprintf("%.2f", rt), goal: "≥ 0.9", verdict: atLeast(rt, 0.9)})
		t.add(row{group: "1", what: what + " CPU per GiB served", peerd: fmt.Sprintf("%.2f s", median(s.cpuPeerd)),
			baseline: fmt.Sprintf("%.2f s", median(s.cpuPlain)), ratio: fmt.Sprintf("%.2f", median(ratios(s.cpuPeerd, s.cpuPlain)))})
	}
	add("cache hit `/blobs/`, one GET", whole)
	add("cache hit `/blobs/`, 1 MiB ranges", ranged)
	add("cache hit `/v2/…/blobs/`, one GET", v2)
	return nil
}
