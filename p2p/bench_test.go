package p2p

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/protocol"
)

// BenchmarkPeerTransport measures the peer data plane alone (no cache, no
// disk): 1 MiB range reads of an in-memory blob, sequential and 4 at a time,
// over (1) plain HTTP/1.1 on loopback, (2) peerd's mutual-TLS HTTP/1.1 peer
// port and (3) a raw libp2p stream (TCP + Noise + yamux) per request, the
// alternative transport. Run: go test -run '^$' -bench PeerTransport ./p2p/
// (PEERD_BENCH_MB sets the size, default 256).
func BenchmarkPeerTransport(b *testing.B) {
	mb := int64(256)
	if v := os.Getenv("PEERD_BENCH_MB"); v != "" {
		mb, _ = strconv.ParseInt(v, 10, 64)
	}
	size := mb << 20
	const chunk = 1 << 20
	data := make([]byte, size)
	rand.Read(data)

	a := startNode(b, nil)
	bn := startNode(b, nil, a)
	waitFor(b, "connected", func() bool { return bn.connected(a.ID()) })
	k := a.store.put(data)
	a.Announcer("test").Holding(k)
	waitFor(b, "advertised", func() bool { return counter(b, a.reg, "peerd_p2p_provides_total", "ok") > 0 })

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	plainSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
	})}
	go plainSrv.Serve(ln)
	defer plainSrv.Close()
	plainURL := "http://" + ln.Addr().String() + "/blob"
	plainClient := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8, DisableCompression: true}}

	// A raw libp2p stream protocol: request "off n\n", answer the bytes.
	const rawProto = protocol.ID("/peerd/bench-raw/1")
	a.Host().SetStreamHandler(rawProto, func(s network.Stream) {
		defer s.Close()
		var off, n int64
		if _, err := fmt.Fscanf(s, "%d %d\n", &off, &n); err != nil {
			s.Reset()
			return
		}
		s.Write(data[off : off+n])
	})

	plain := func(off int64) (int64, error) {
		req, _ := http.NewRequest("GET", plainURL, nil)
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+chunk-1))
		resp, err := plainClient.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		return io.Copy(io.Discard, resp.Body)
	}
	peerTLS := func(off int64) (int64, error) {
		rc, _, err := bn.Source().Fetch(context.Background(), k, off, chunk)
		if err != nil {
			return 0, err
		}
		defer rc.Close()
		return io.Copy(io.Discard, rc)
	}
	raw := func(off int64) (int64, error) {
		s, err := bn.Host().NewStream(context.Background(), a.ID(), rawProto)
		if err != nil {
			return 0, err
		}
		defer s.Close()
		fmt.Fprintf(s, "%d %d\n", off, chunk)
		s.CloseWrite()
		return io.Copy(io.Discard, s)
	}
	run := func(get func(int64) (int64, error), par int) float64 {
		start := time.Now()
		offs := make(chan int64)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var firstErr error
		for w := 0; w < par; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for off := range offs {
					n, err := get(off)
					if err == nil && n != chunk {
						err = fmt.Errorf("short read at %d: %d", off, n)
					}
					if err != nil {
						mu.Lock()
						firstErr = err
						mu.Unlock()
					}
				}
			}()
		}
		for off := int64(0); off+chunk <= size; off += chunk {
			offs <- off
		}
		close(offs)
		wg.Wait()
		if firstErr != nil {
			b.Fatal(firstErr)
		}
		return float64(size) / (1 << 20) / time.Since(start).Seconds()
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, par := range []int{1, 4} {
			p := run(plain, par)
			t := run(peerTLS, par)
			r := run(raw, par)
			b.ReportMetric(t/p, fmt.Sprintf("tls/plain-x%d", par))
			b.ReportMetric(r/p, fmt.Sprintf("libp2p/plain-x%d", par))
			fmt.Printf("\npeer transport, %d MiB in 1 MiB ranges, %d at a time:\n", mb, par)
			fmt.Printf("  plain HTTP/1.1          %7.0f MiB/s\n", p)
			fmt.Printf("  peerd mTLS HTTP/1.1     %7.0f MiB/s  ratio %.2f\n", t, t/p)
			fmt.Printf("  libp2p stream (yamux)   %7.0f MiB/s  ratio %.2f\n", r, r/p)
		}
	}
}
