package main

import (
	"os"
	"strings"
	"testing"
	"time"
)

func TestMedianAndQuantile(t *testing.T) {
	if got := median([]float64{3, 1, 2}); got != 2 {
		t.Errorf("median of 3: %v", got)
	}
	if got := median([]float64{4, 1, 3, 2}); got != 2.5 {
		t.Errorf("median of 4: %v", got)
	}
	if got := median(nil); got != 0 {
		t.Errorf("median of none: %v", got)
	}
	d := make([]time.Duration, 100)
	for i := range d {
		d[i] = time.Duration(100-i) * time.Millisecond // unsorted on purpose
	}
	if p50, p99 := quantile(d, .5), quantile(d, .99); p50 != 51*time.Millisecond || p99 != 99*time.Millisecond {
		t.Errorf("p50 %v p99 %v", p50, p99)
	}
	if got := ratios([]float64{2, 3}, []float64{1, 0}); len(got) != 1 || got[0] != 2 {
		t.Errorf("ratios skip a zero baseline: %v", got)
	}
}

func TestProcReaders(t *testing.T) {
	// Burn a little CPU so the counter moves past one clock tick.
	c0, err := cpuSeconds(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// Busy until the counter moves: on a loaded machine 50 ms of wall time
	// may hold less than the 10 ms of CPU that one tick is.
	x := 0
	c1 := c0
	for start := time.Now(); c1 == c0 && time.Since(start) < 10*time.Second; {
		for range 1 << 20 {
			x++
		}
		if c1, err = cpuSeconds(os.Getpid()); err != nil {
			t.Fatal(err)
		}
	}
	if c1 <= c0 || c1-c0 > 5 {
		t.Errorf("CPU seconds went from %v to %v over a busy loop of up to 10 s (x=%d)", c0, c1, x)
	}
	rss, err := rssMiB(os.Getpid(), "VmRSS")
	if err != nil || rss < 1 || rss > 4096 {
		t.Errorf("VmRSS %v MiB, %v", rss, err)
	}
	if _, err := rssMiB(os.Getpid(), "NoSuchField"); err == nil {
		t.Error("a missing field read without error")
	}
	if p := rssParts(os.Getpid()); !strings.HasPrefix(p, "anonymous ") || !strings.Contains(p, "file pages") {
		t.Errorf("rssParts = %q", p)
	}
}
