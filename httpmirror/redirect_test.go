package httpmirror

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/internal/reliability"
	"github.com/peerd-project/peerd/upstream"
)

// countingListener counts the connections a test server accepts.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// loopbackServer serves h on ip (a 127.0.0.0/8 address) at a free port.
func loopbackServer(t *testing.T, ip string, h http.Handler) (*countingListener, string) {
	t.Helper()
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Skipf("cannot listen on %s: %v", ip, err)
	}
	cl := &countingListener{Listener: ln}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(cl)
	t.Cleanup(func() { srv.Close() })
	return cl, "http://" + ln.Addr().String()
}

// blobsNode is a /blobs/ face on 127.0.0.1 with the given allow-list,
// logging into log (nil: discarded).
func blobsNode(t *testing.T, allow []string, log *slog.Logger, opts upstream.Options) (*countingListener, string) {
	t.Helper()
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	c, err := cache.Open(cache.Options{Dir: t.TempDir(), ChunkSize: 64 << 10, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	al, err := upstream.ParseAllowList(allow)
	if err != nil {
		t.Fatal(err)
	}
	opts.Logger = log
	if opts.Backoff == 0 {
		opts.Backoff = time.Millisecond
	}
	return loopbackServer(t, "127.0.0.1", New(Config{Cache: c, Upstream: upstream.NewClient(opts), Allow: al, Logger: log}))
}

func getWithin(t *testing.T, u string, timeout time.Duration, hdr ...string) (*http.Response, []byte, time.Duration) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	start := time.Now()
	resp, err := (&http.Client{Timeout: timeout}).Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", upstream.Bound(u), err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, body, time.Since(start)
}

// A redirect from an allowed origin to a host or port no pattern admits is
// refused before any connection to it, whatever the status of the redirect.
func TestBlobsRedirectToHostNotAllowed(t *testing.T) {
	other := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "OTHER HOST BYTES") })
	otherHost, otherHostURL := loopbackServer(t, "127.0.0.3", other)
	otherPort, otherPortURL := loopbackServer(t, "127.0.0.2", other)
	var target atomic.Value
	_, originURL := loopbackServer(t, "127.0.0.2", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, target.Load().(string)+r.URL.Path, http.StatusFound)
	}))
	ou, _ := url.Parse(originURL)
	_, node := blobsNode(t, []string{ou.Host}, nil, upstream.Options{})
	for _, tc := range []struct {
		name, to string
		conns    *countingListener
	}{{"another host", otherHostURL, otherHost}, {"another port", otherPortURL, otherPort}} {
		t.Run(tc.name, func(t *testing.T) {
			target.Store(tc.to)
			resp, body, took := getWithin(t, node+"/blobs/"+originURL+"/file-"+strings.ReplaceAll(tc.name, " ", "-"), 30*time.Second)
			if resp.StatusCode != http.StatusForbidden {
				t.Fatalf("status %s (%s), want 403", resp.Status, body)
			}
			if strings.Contains(string(body), "OTHER HOST BYTES") {
				t.Fatal("the disallowed host's body was returned")
			}
			if !strings.Contains(string(body), "upstream-allow") {
				t.Errorf("reason %q does not name the allow-list", body)
			}
			if n := tc.conns.n.Load(); n != 0 {
				t.Fatalf("the disallowed %s was connected to %d times", tc.name, n)
			}
			reliability.Record(t, reliability.Row{Area: "probe",
				Case:    "302 from the only allowed origin to " + tc.name + " not allowed",
				Outcome: fmt.Sprintf("%d, the redirect target never contacted", resp.StatusCode),
				Figure:  fmt.Sprintf("%d in %.1f ms, %d connections to %s", resp.StatusCode, float64(took.Microseconds())/1000, tc.conns.n.Load(), strings.Replace(tc.name, "another", "the other", 1))})
		})
	}
}

// An origin that redirects back to peerd's own /blobs/ URL (a loop through
// the node) fails at once instead of waiting on the fill it is part of.
func TestBlobsRedirectLoopToItself(t *testing.T) {
	var node string
	digestPath := "/v2/r/blobs/sha256:" + strings.Repeat("ab", 32)
	var originHits atomic.Int64
	_, originURL := loopbackServer(t, "127.0.0.2", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		originHits.Add(1)
		http.Redirect(w, r, node+"/blobs/"+"http://"+r.Host+r.URL.Path, http.StatusTemporaryRedirect)
	}))
	// Both the origin and the node itself match the allow-list.
	self, nodeURL := blobsNode(t, []string{"127.0.0.1", "127.0.0.2"}, nil, upstream.Options{})
	node = nodeURL
	resp, body, took := getWithin(t, node+"/blobs/"+originURL+digestPath, 20*time.Second)
	if resp.StatusCode < 400 {
		t.Fatalf("status %s, want an error", resp.Status)
	}
	if hits := originHits.Load(); hits != 1 {
		t.Fatalf("origin asked %d times, want once", hits)
	}
	if !strings.Contains(string(body), "508") {
		t.Fatalf("reason %q does not name the loop (508)", body)
	}
	// A /blobs/ URL that names the node's own /blobs/ face (same digest) as
	// its origin ends the same way.
	resp, body, _ = getWithin(t, node+"/blobs/"+node+"/blobs/"+originURL+digestPath, 20*time.Second)
	if resp.StatusCode < 400 || !strings.Contains(string(body), "508") {
		t.Fatalf("origin naming the node itself: %s (%s), want an error naming the 508", resp.Status, body)
	}
	reliability.Record(t, reliability.Row{Area: "probe",
		Case:    "origin redirects /blobs/ back to the node's own /blobs/ URL (a loop)",
		Outcome: fmt.Sprintf("%d naming the 508 the redirected request got; no wait on its own fill", resp.StatusCode),
		Figure:  fmt.Sprintf("%d in %.1f ms, origin asked %d time, %d connections to the node", resp.StatusCode, float64(took.Microseconds())/1000, originHits.Load(), self.n.Load())})
}

// A pull-through registry that redirects back to the node's own /v2/ URL
// gets an answer at once, not a wait on the fill the request is part of.
func TestPullThroughRedirectLoopToItself(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	c, err := cache.Open(cache.Options{Dir: t.TempDir(), ChunkSize: 64 << 10, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	var node string
	k := "sha256:" + strings.Repeat("cd", 32)
	var regHits atomic.Int64
	_, regURL := loopbackServer(t, "127.0.0.2", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		regHits.Add(1)
		http.Redirect(w, r, node+r.URL.Path+"?ns=registry.example", http.StatusTemporaryRedirect)
	}))
	oci := NewOCI(OCIConfig{Cache: c, PullThrough: map[string]string{"registry.example": regURL},
		Upstream: upstream.NewClient(upstream.Options{Logger: log, Backoff: time.Millisecond}), Logger: log})
	_, node = loopbackServer(t, "127.0.0.1", New(Config{Cache: c, OCI: oci, Logger: log}))
	resp, body, _ := getWithin(t, node+"/v2/lib/app/blobs/"+k+"?ns=registry.example", 20*time.Second)
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("status %s (%s), want 404 (containerd moves on to its next host)", resp.Status, body)
	}
	if hits := regHits.Load(); hits != 1 {
		t.Errorf("registry asked %d times, want once", hits)
	}
}
