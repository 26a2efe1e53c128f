package upstream

import (
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// serveOn serves h on ip (127.0.0.0/8) at a free port and returns its URL.
func serveOn(t *testing.T, ip string, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Skipf("cannot listen on %s: %v", ip, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String()
}

// fe80::/10 is refused by the allow-list even when a pattern names it, and
// by the dialer.
func TestLinkLocalV6Refused(t *testing.T) {
	a, err := ParseAllowList([]string{"[fe80::1]", "[febf::1]:80"})
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{"http://[fe80::1]/x", "http://[febf::1]:80/x", "http://[FE80::1%25lo]/x"} {
		if err := a.Check(mustURL(u)); !errors.Is(err, ErrNotAllowed) {
			t.Errorf("Check(%s) = %v, want ErrNotAllowed", u, err)
		}
	}
	c := NewClient(Options{DialTimeout: time.Second, Attempts: 1})
	for _, u := range []string{"http://[fe80::1]/latest", "http://[fe80::1%25lo]:80/latest"} {
		_, _, err := fetchAll(t, c.Source(mustURL(u), nil, nil), 0, 1)
		if !errors.Is(err, ErrNotAllowed) {
			t.Errorf("fetch %s: %v, want ErrNotAllowed", u, err)
		}
	}
}

// Authorization follows a redirect on the same host and port only: another
// port or another host never sees it.
func TestAuthorizationOnRedirect(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]string{}
	record := func(name string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			seen[name] = r.Header.Get("Authorization")
			mu.Unlock()
			w.Write([]byte("data"))
		})
	}
	otherPort := serveOn(t, "127.0.0.1", record("other port"))
	otherHost := serveOn(t, "127.0.0.2", record("other host"))
	var origin string
	origin = serveOn(t, "127.0.0.1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/same":
			http.Redirect(w, r, origin+"/target", http.StatusFound)
		case "/target":
			record("same host").ServeHTTP(w, r)
		case "/port":
			http.Redirect(w, r, otherPort+"/x", http.StatusFound)
		case "/host":
			http.Redirect(w, r, otherHost+"/x", http.StatusFound)
		}
	}))
	c := NewClient(Options{Attempts: 1})
	hdr := http.Header{"Authorization": {"Bearer TOKEN"}}
	for _, p := range []string{"/same", "/port", "/host"} {
		if b, _, err := fetchAll(t, c.Source(mustURL(origin+p), hdr, nil), 0, 4); err != nil || string(b) != "data" {
			t.Fatalf("%s: %q %v", p, b, err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	want := map[string]string{"same host": "Bearer TOKEN", "other port": "", "other host": ""}
	for k, v := range want {
		if got, ok := seen[k]; !ok || got != v {
			t.Errorf("%s saw Authorization %q (reached: %v), want %q", k, got, ok, v)
		}
	}
}

// 429 and connection errors are retried (Attempts tries in all); a 4xx
// other than 429 is not.
func TestRetriesOn429AndConnectionErrors(t *testing.T) {
	var tooMany atomic.Int32
	u := serveOn(t, "127.0.0.1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tooMany.Add(1)
		w.Header().Set("Retry-After", "0")
		http.Error(w, "slow down", http.StatusTooManyRequests)
	}))
	c := NewClient(Options{Attempts: 3, Backoff: time.Millisecond})
	_, _, err := fetchAll(t, c.Source(mustURL(u+"/f"), nil, nil), 0, 1)
	var se *StatusError
	if !errors.As(err, &se) || se.Code != http.StatusTooManyRequests || tooMany.Load() != 3 {
		t.Fatalf("429: %v after %d attempts, want the 429 after 3", err, tooMany.Load())
	}

	// A server that accepts and closes every connection at once.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int32
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			conn.Close()
		}
	}()
	_, _, err = fetchAll(t, c.Source(mustURL("http://"+ln.Addr().String()+"/f"), nil, nil), 0, 1)
	if err == nil || accepted.Load() != 3 {
		t.Fatalf("connection reset: %v after %d connections, want an error after 3", err, accepted.Load())
	}
}

// The HTTP/2 health ping is set on the transport the client uses: a quiet
// connection is pinged after SendPingTimeout and closed when the ping is not
// answered within PingTimeout. (net/http's bundled HTTP/2 transport is
// unexported and built from Transport.HTTP2 on first use, so this is the
// setting it reads.)
func TestHTTP2HealthPingConfigured(t *testing.T) {
	tr, ok := NewClient(Options{}).hc.Transport.(*http.Transport)
	if !ok {
		t.Fatalf("transport is %T", NewClient(Options{}).hc.Transport)
	}
	if !tr.ForceAttemptHTTP2 || tr.HTTP2 == nil {
		t.Fatalf("HTTP/2 not configured: force %v, config %+v", tr.ForceAttemptHTTP2, tr.HTTP2)
	}
	if tr.HTTP2.SendPingTimeout != 15*time.Second || tr.HTTP2.PingTimeout != 10*time.Second {
		t.Fatalf("health ping: SendPingTimeout %v, PingTimeout %v; want 15s and 10s", tr.HTTP2.SendPingTimeout, tr.HTTP2.PingTimeout)
	}
}
