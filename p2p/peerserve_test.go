package p2p

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/internal/reliability"
)

// A range past the end is the asker's mistake, not the provider's: the
// first 416 ends the fetch, no other provider is asked and none is avoided.
func TestSourceStopsAtAnUnsatisfiableRange(t *testing.T) {
	s, _, g, ids := setup(t, "past-end", "past-end", "past-end")
	size := int64(len(g.data))
	_, _, err := s.Fetch(context.Background(), testKey(), size, -1)
	if !errors.Is(err, ErrRangeNotSatisfiable) {
		t.Fatalf("fetch at the end: %v, want ErrRangeNotSatisfiable", err)
	}
	if errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("a 416 must not read as a clean not-found: %v", err)
	}
	if c := g.calls(); len(c) != 1 {
		t.Fatalf("%d peer requests for an offset past the end, want 1", len(c))
	}
	all := []peer.AddrInfo{{ID: ids[0]}, {ID: ids[1]}, {ID: ids[2]}}
	if got := s.order(all); len(got) != 3 {
		t.Fatalf("after a 416 only %d of 3 providers are still asked", len(got))
	}
	asked := len(g.calls())
	// The providers still serve a range inside the blob.
	if b, _, err := readAll(t, s, size-10, 10); err != nil || len(b) != 10 {
		t.Fatalf("the last 10 bytes: %d bytes, %v", len(b), err)
	}
	reliability.Record(t, reliability.Row{Area: "probe",
		Case:    "a fetch at the blob's end with three providers that each answer 416",
		Outcome: "the first 416 ends the fetch with ErrRangeNotSatisfiable (not a not-found); no other provider asked, none avoided",
		Figure:  fmt.Sprintf("%d of 3 providers asked, %d of 3 still eligible", asked, len(s.order(all)))})
}

// peerPair starts two connected nodes and returns them with b's transport
// to a's data plane.
func peerPair(t *testing.T) (a, b *testNode, pc *peerConn) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts libp2p hosts")
	}
	a = startNode(t, nil)
	b = startNode(t, nil, a)
	waitFor(t, "b connected to a", func() bool { return b.connected(a.ID()) && a.connected(b.ID()) })
	pc, err := b.client.conn(context.Background(), peer.AddrInfo{ID: a.ID(), Addrs: a.Host().Addrs()})
	if err != nil {
		t.Fatalf("b's data-plane connection to a: %v", err)
	}
	return a, b, pc
}

type peerAnswer struct {
	code   int
	cr     string
	length int
}

func peerGet(t *testing.T, pc *peerConn, path string, hdr map[string]string) peerAnswer {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "https://"+pc.addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := pc.client.Do(req)
	if err != nil {
		t.Fatalf("GET %s %v: %v", path, hdr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		t.Fatalf("GET %s %v: body: %v", path, hdr, err)
	}
	return peerAnswer{resp.StatusCode, resp.Header.Get("Content-Range"), len(body)}
}

func TestPeerServerRangeAtOrPastTheEndIs416(t *testing.T) {
	a, b, pc := peerPair(t)
	data := make([]byte, 1000)
	rand.Read(data)
	k := a.store.put(data)
	empty := a.store.put(nil)
	path := "/blobs/" + string(k)
	for _, c := range []struct {
		path, rng string
		want      peerAnswer
	}{
		{path, "bytes=999-", peerAnswer{206, "bytes 999-999/1000", 1}},
		{path, "bytes=990-2000", peerAnswer{206, "bytes 990-999/1000", 10}},
		{path, "bytes=1000-", peerAnswer{416, "bytes */1000", -1}},
		{path, "bytes=1000-1999", peerAnswer{416, "bytes */1000", -1}},
		{path, "bytes=5000-", peerAnswer{416, "bytes */1000", -1}},
		// The whole of an empty blob is zero bytes; anything after its end
		// is unsatisfiable.
		{"/blobs/" + string(empty), "bytes=0-", peerAnswer{206, "bytes */0", 0}},
		{"/blobs/" + string(empty), "bytes=1-", peerAnswer{416, "bytes */0", -1}},
	} {
		got := peerGet(t, pc, c.path, map[string]string{"Range": c.rng})
		if c.want.length < 0 {
			got.length = -1 // the 416 body is a short reason
		}
		if got != c.want {
			t.Errorf("%s %s: got %+v, want %+v", c.path[:16], c.rng, got, c.want)
		}
	}
	// The client side turns the 416 into ErrRangeNotSatisfiable.
	ai := peer.AddrInfo{ID: a.ID()}
	if _, _, err := b.client.GetRange(context.Background(), ai, k, 1000, -1); !errors.Is(err, ErrRangeNotSatisfiable) {
		t.Fatalf("GetRange at the end: %v, want ErrRangeNotSatisfiable", err)
	}
	if t.Failed() {
		return
	}
	got := peerGet(t, pc, path, map[string]string{"Range": "bytes=1000-"})
	reliability.Record(t, reliability.Row{Area: "probe",
		Case:    "a peer asks bytes=<size>- (and past the end) of a 1000-byte blob",
		Outcome: "416 with Content-Range bytes */size; the asking node's client returns ErrRangeNotSatisfiable",
		Figure:  fmt.Sprintf("status %d, Content-Range %q", got.code, got.cr)})
}

// Hostile or malformed requests from a member get a 4xx and the server
// keeps serving.
func TestPeerServerAnswersHostileRequestsWith4xx(t *testing.T) {
	a, _, pc := peerPair(t)
	data := []byte("some layer bytes")
	k := a.store.put(data)
	path := "/blobs/" + string(k)
	for _, c := range []struct {
		name string
		path string
		hdr  map[string]string
		want int
	}{
		{"huge offset", path, map[string]string{"Range": "bytes=9223372036854775807-"}, 416},
		{"offset past int64", path, map[string]string{"Range": "bytes=99999999999999999999-"}, 416},
		{"length past int64", path, map[string]string{"Range": "bytes=0-9223372036854775807"}, 416},
		{"suffix range", path, map[string]string{"Range": "bytes=-5"}, 416},
		{"reversed", path, map[string]string{"Range": "bytes=5-3"}, 416},
		{"negative", path, map[string]string{"Range": "bytes=-1-3"}, 416},
		{"multi", path, map[string]string{"Range": "bytes=0-1,3-4"}, 416},
		{"other unit", path, map[string]string{"Range": "items=0-1"}, 416},
		{"not a digest", "/blobs/sha256:xyz", nil, 400},
		{"url key", "/blobs/https://example.com/x", nil, 400},
		{"unknown path", "/admin", nil, 400},
		{"traversal", "/blobs/../../etc/passwd", nil, 400},
		{"oversized header", path, map[string]string{"X-Pad": strings.Repeat("a", 64<<10)}, 431},
	} {
		got := peerGet(t, pc, c.path, c.hdr)
		if got.code != c.want {
			t.Errorf("%s: status %d, want %d", c.name, got.code, c.want)
		}
	}
	// Still serving.
	if got := peerGet(t, pc, path, map[string]string{"Range": "bytes=0-3"}); got.code != 206 || got.length != 4 {
		t.Fatalf("after the hostile requests: %+v", got)
	}
}

func TestPeerDataAddrTakesOnlyUsableIPs(t *testing.T) {
	remote := net.ParseIP("127.0.0.7")
	for _, c := range []struct {
		line, want string
	}{
		{"127.0.0.2:4001\n", "127.0.0.2:4001"},
		{"[::1]:4001", "[::1]:4001"},
		{"10.1.2.3:4001", "10.1.2.3:4001"},
		{"[::ffff:10.1.2.3]:4001", "10.1.2.3:4001"},
		{":4001", "127.0.0.7:4001"},
		// Names: never resolved or dialled.
		{"localhost:4001", ""},
		{"metadata.google.internal:80", ""},
		{"example.com:443", ""},
		{"127.0.0.1.nip.io:4001", ""},
		// Addresses no peer listens on.
		{"169.254.169.254:80", ""},
		{"[fe80::1]:4001", ""},
		{"[fe80::1%eth0]:4001", ""},
		{"[fd00:ec2::254]:80", ""},
		{"[::ffff:169.254.169.254]:80", ""},
		{"0.0.0.0:4001", ""},
		{"[::]:4001", ""},
		{"224.0.0.1:4001", ""},
		{"[ff02::1]:4001", ""},
		{"255.255.255.255:4001", ""},
		// Malformed.
		{"127.0.0.1:0", ""},
		{"127.0.0.1:65536", ""},
		{"127.0.0.1:+80", ""},
		{"127.0.0.1", ""},
		{"", ""},
	} {
		got, err := peerDataAddr(c.line, remote)
		if c.want == "" {
			if err == nil {
				t.Errorf("%q: took %q, want refused", c.line, got)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%q: %q, %v; want %q", c.line, got, err, c.want)
		}
	}
	if _, err := peerDataAddr(":4001", net.ParseIP("169.254.1.1")); err == nil {
		t.Error(":port on a link-local connection taken")
	}
	if t.Failed() {
		return
	}
	_, err := peerDataAddr("metadata.google.internal:80", remote)
	_, err2 := peerDataAddr("169.254.169.254:80", remote)
	reliability.Record(t, reliability.Row{Area: "probe",
		Case:    "a peer answers its data-plane address with a host name, a metadata/link-local, unspecified or multicast IP",
		Outcome: "refused before any lookup or connection; only literal unicast IP:port is dialled",
		Figure:  fmt.Sprintf("%q; %q", err, err2)})
}

// blockingReader holds a transfer open until release is closed.
type blockingReader struct{ release chan struct{} }

func (r blockingReader) Read(p []byte) (int, error) {
	<-r.release
	return 0, io.EOF
}

// One peer asking for more transfers than the server has slots gets 503 +
// Retry-After at once for the extra ones (never a queue or a hang), and the
// slots come back when the transfers end.
func TestPeerServerRefusesTransfersBeyondItsSlots(t *testing.T) {
	a, _, pc := peerPair(t)
	release := make(chan struct{})
	var opened atomic.Int64
	blocked := blob.Key("sha256:" + strings.Repeat("ab", 32))
	a.AddStore(LocalStoreFunc(func(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
		if k != blocked {
			return nil, -1, blob.ErrNotFound
		}
		opened.Add(1)
		return io.NopCloser(blockingReader{release}), 1 << 20, nil
	}))
	type result struct {
		code int
		err  error
	}
	results := make(chan result, DefaultUploadStreams)
	for range DefaultUploadStreams {
		go func() {
			// 128 TLS handshakes at once can outlast the client's handshake
			// timeout on a loaded machine: such a request never reached the
			// server, so it is asked again.
			var resp *http.Response
			var err error
			for try := 0; try < 10; try++ {
				if resp, err = pc.client.Get("https://" + pc.addr + "/blobs/" + string(blocked)); err == nil {
					break
				}
			}
			if err != nil {
				results <- result{0, err}
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			results <- result{resp.StatusCode, nil}
		}()
	}
	deadline := time.Now().Add(60 * time.Second)
	for opened.Load() < DefaultUploadStreams {
		if time.Now().After(deadline) {
			close(release)
			t.Fatalf("the server started %d of %d transfers", opened.Load(), DefaultUploadStreams)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Every slot is taken: one more gets 503 at once.
	data := []byte("small blob")
	k := a.store.put(data)
	extra := peerGet(t, pc, "/blobs/"+string(k), map[string]string{"Range": "bytes=0-3"})
	close(release)
	if extra.code != http.StatusServiceUnavailable {
		t.Fatalf("request %d with all slots busy: status %d, want 503", DefaultUploadStreams+1, extra.code)
	}
	for range DefaultUploadStreams {
		select {
		case r := <-results:
			if r.err != nil || r.code != http.StatusPartialContent {
				t.Fatalf("a blocked transfer ended with %d, %v", r.code, r.err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("blocked transfers did not end after release")
		}
	}
	if got := peerGet(t, pc, "/blobs/"+string(k), map[string]string{"Range": "bytes=0-3"}); got.code != 206 || got.length != 4 {
		t.Fatalf("after the transfers ended: %+v", got)
	}
}
