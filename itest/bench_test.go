package itest

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"testing"
	"time"
)

// fileOrigin serves files from a folder with http.FileServer (sendfile), the
// fastest plain origin Go offers; it counts requests.
func fileOrigin(b testing.TB, ip, dir string) (string, func()) {
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: http.FileServer(http.Dir(dir))}
	go srv.Serve(ln)
	return "http://" + ln.Addr().String(), func() { srv.Close() }
}

// writeRandomFile writes size random bytes to dir/name (under the storage
// layout path) and returns the digest and the path relative to dir.
func writeRandomFile(b testing.TB, dir string, size int64) (string, string) {
	tmp := filepath.Join(dir, "tmp")
	f, err := os.Create(tmp)
	if err != nil {
		b.Fatal(err)
	}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for left := size; left > 0; left -= int64(len(buf)) {
		rand.Read(buf)
		n := min(int64(len(buf)), left)
		f.Write(buf[:n])
		h.Write(buf[:n])
	}
	f.Close()
	dg := "sha256:" + hex.EncodeToString(h.Sum(nil))
	rel := storagePath(dg)
	os.MkdirAll(filepath.Dir(filepath.Join(dir, rel)), 0o755)
	if err := os.Rename(tmp, filepath.Join(dir, rel)); err != nil {
		b.Fatal(err)
	}
	return dg, rel
}

// sequentialRead reads url in chunk-sized Range requests over one keep-alive
// connection and returns MiB/s and per-request latencies.
func sequentialRead(b testing.TB, url string, size, chunk int64) (float64, []time.Duration) {
	tr := &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	lat := make([]time.Duration, 0, size/chunk+1)
	start := time.Now()
	for off := int64(0); off < size; off += chunk {
		t0 := time.Now()
		req, _ := http.NewRequest("GET", url, nil)
		req.Header.Set("Range", "bytes="+strconv.FormatInt(off, 10)+"-"+strconv.FormatInt(min(off+chunk, size)-1, 10))
		resp, err := c.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 206 || n != min(chunk, size-off) {
			b.Fatalf("GET %s at %d: status %d, %d bytes, %v", url, off, resp.StatusCode, n, err)
		}
		lat = append(lat, time.Since(t0))
	}
	return float64(size) / (1 << 20) / time.Since(start).Seconds(), lat
}

func pct(d []time.Duration, p float64) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[int(float64(len(s)-1)*p)]
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// BenchmarkBlobsProxySequential reads a blob (PEERD_BENCH_MB, default 512 MiB)
// in 1 MiB Range requests over one connection: straight from the origin, then
// through /blobs/ cold (cache filling), then warm, then from a plain Go file
// server serving the cache's own backing file. Rounds alternate to even out
// noise; the ratios are medians.
func BenchmarkBlobsProxySequential(b *testing.B) {
	mb := int64(512)
	if v := os.Getenv("PEERD_BENCH_MB"); v != "" {
		mb, _ = strconv.ParseInt(v, 10, 64)
	}
	size := mb << 20
	const chunk = 1 << 20
	rounds := 3
	originDir := b.TempDir()
	// Round 0 is a warm-up that is not counted: on a freshly booted VM the
	// first write into never-touched RAM (page cache) runs at a fraction of
	// the speed of later ones, which says nothing about peerd. Each round's
	// cache is deleted afterwards so the next round reuses that memory, as
	// on a node that has been up for a while.
	originURL, stop := fileOrigin(b, "127.0.0.1", originDir)
	defer stop()
	var direct, cold, warm, plain []float64
	var coldLat, warmLat []time.Duration
	for r := 0; r <= rounds; r++ {
		dg, rel := writeRandomFile(b, originDir, size)
		n := StartNode(b, NodeOpts{DataDir: filepath.Join(b.TempDir(), "node"), Args: []string{"--upstream-allow", originURL[len("http://"):], "--cache-size", fmt.Sprintf("%dMiB", 2*mb+64)}})
		d, _ := sequentialRead(b, originURL+rel, size, chunk)
		c, cl := sequentialRead(b, n.URL("/blobs/"+originURL+rel), size, chunk)
		w, wl := sequentialRead(b, n.URL("/blobs/"+originURL+rel), size, chunk)
		cacheFile := filepath.Join(n.DataDir, "cache", "blobs", "sha256", dg[len("sha256:"):])
		plainURL, stopPlain := fileOrigin(b, "127.0.0.1", cacheFile)
		p, _ := sequentialRead(b, plainURL+"/data", size, chunk)
		stopPlain()
		n.Stop()
		os.Remove(filepath.Join(originDir, rel))
		os.RemoveAll(n.DataDir)
		if r == 0 {
			fmt.Printf("warm-up round (not counted): direct %.0f, cold %.0f, warm %.0f, file server %.0f MiB/s\n", d, c, w, p)
			continue
		}
		direct, cold, warm, plain = append(direct, d), append(cold, c), append(warm, w), append(plain, p)
		coldLat, warmLat = append(coldLat, cl...), append(warmLat, wl...)
	}
	coldRatio := median(ratio(cold, direct))
	warmRatio := median(ratio(warm, plain))
	b.ReportMetric(median(direct), "direct-MiB/s")
	b.ReportMetric(median(cold), "cold-MiB/s")
	b.ReportMetric(median(warm), "warm-MiB/s")
	b.ReportMetric(median(plain), "fileserver-MiB/s")
	b.ReportMetric(coldRatio, "cold/direct")
	b.ReportMetric(warmRatio, "warm/fileserver")
	fmt.Printf("\n/blobs/ sequential read, %d MiB in 1 MiB ranges, one connection, %d rounds (medians)\n", mb, rounds)
	fmt.Printf("  %-34s %8.0f MiB/s\n", "origin direct", median(direct))
	fmt.Printf("  %-34s %8.0f MiB/s  ratio %.2f (goal >= 0.8)  p50 %v p99 %v\n", "peerd cold (cache filling)", median(cold), coldRatio, pct(coldLat, .5), pct(coldLat, .99))
	fmt.Printf("  %-34s %8.0f MiB/s\n", "plain Go file server (cache file)", median(plain))
	fmt.Printf("  %-34s %8.0f MiB/s  ratio %.2f (goal >= 0.9)  p50 %v p99 %v\n", "peerd warm (cache hit)", median(warm), warmRatio, pct(warmLat, .5), pct(warmLat, .99))
}

func ratio(a, b []float64) []float64 {
	r := make([]float64, len(a))
	for i := range a {
		r[i] = a[i] / b[i]
	}
	return r
}
