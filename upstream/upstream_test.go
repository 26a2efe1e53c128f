package upstream

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
)

func mustURL(s string) *url.URL {
	u, err := url.Parse(s)
	if err != nil {
		panic(err)
	}
	return u
}

func TestAllowList(t *testing.T) {
	a, err := ParseAllowList([]string{"registry.example.com", "*.blob.core.example.net,127.0.0.1:8080", "[::1]:9000"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		url string
		ok  bool
	}{
		{"https://registry.example.com/v2/x", true},
		{"https://REGISTRY.example.com:5000/v2/x", true}, // no port in pattern: any port
		{"https://registry.example.com.evil.org/x", false},
		{"https://evilregistry.example.com/x", false},
		{"https://x.registry.example.com/x", false},
		{"https://acct.blob.core.example.net/c/b?sig=registry.example.com", true},
		{"https://a.b.blob.core.example.net/c", true},
		{"https://blob.core.example.net/c", false}, // wildcard needs a label
		{"https://evil.org/?h=x.blob.core.example.net", false},
		{"http://127.0.0.1:8080/f", true},
		{"http://127.0.0.1:8081/f", false},
		{"http://127.0.0.1/f", false},
		{"http://[::1]:9000/f", true},
		{"http://169.254.169.254/latest/meta-data", false},
		{"http://[fd00:ec2::254]/", false},
	} {
		err := a.Check(mustURL(tc.url))
		if (err == nil) != tc.ok {
			t.Errorf("Check(%s) = %v, want allowed=%v", tc.url, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrNotAllowed) {
			t.Errorf("Check(%s) error does not wrap ErrNotAllowed: %v", tc.url, err)
		}
	}
	// Link-local is refused even when a pattern names it.
	ll, _ := ParseAllowList([]string{"169.254.169.254"})
	if ll.Check(mustURL("http://169.254.169.254/")) == nil {
		t.Error("link-local metadata address allowed by an explicit pattern")
	}
	for _, bad := range []string{"*", "a*.example.com", "http://x", "x:notaport", "x:0", "user@x", "*.bücher.example", "]0", "[x]", "a..b", ".b", "a b"} {
		if _, err := ParseAllowList([]string{bad}); err == nil {
			t.Errorf("pattern %q accepted", bad)
		}
	}
}

func TestParseContentRange(t *testing.T) {
	for _, tc := range []struct {
		in          string
		start, size int64
		ok          bool
	}{
		{"bytes 0-0/100", 0, 100, true},
		{"bytes 10-19/*", 10, -1, true},
		{"bytes */42", 0, 42, true},
		{"bytes x-1/2", 0, 0, false},
		{"items 0-1/2", 0, 0, false},
		{"bytes 0-1", 0, 0, false},
	} {
		start, size, err := parseContentRange(tc.in)
		if (err == nil) != tc.ok || (tc.ok && (start != tc.start || size != tc.size)) {
			t.Errorf("parseContentRange(%q) = %d, %d, %v", tc.in, start, size, err)
		}
	}
}

func fetchAll(t *testing.T, s blob.Source, off, n int64) ([]byte, int64, error) {
	t.Helper()
	rc, size, err := s.Fetch(context.Background(), "", off, n)
	if err != nil {
		return nil, size, err
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	return b, size, err
}

func TestFetchRangesAndFallbacks(t *testing.T) {
	data := bytes.Repeat([]byte("0123456789"), 1000)
	var ignoreRange atomic.Bool
	var gotAuth, gotCookie atomic.Value
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth.Store(r.Header.Get("Authorization"))
		gotCookie.Store(r.Header.Get("Cookie"))
		if ignoreRange.Load() {
			w.Header().Set("Content-Length", "10000")
			w.Write(data)
			return
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
	}))
	defer srv.Close()
	c := NewClient(Options{})
	src := c.Source(mustURL(srv.URL+"/f"), http.Header{"Authorization": {"Bearer t"}}, nil)
	if src.Name() != "upstream" {
		t.Fatal("origin must be a source named upstream")
	}
	for _, ign := range []bool{false, true} {
		ignoreRange.Store(ign)
		b, size, err := fetchAll(t, src, 1234, 100)
		if err != nil || size != int64(len(data)) || !bytes.Equal(b, data[1234:1334]) {
			t.Fatalf("ignoreRange=%v: size %d err %v equal %v", ign, size, err, bytes.Equal(b, data[1234:1334]))
		}
		// A range past the end returns what there is.
		b, _, err = fetchAll(t, src, int64(len(data))-10, 100)
		if err != nil || !bytes.Equal(b, data[len(data)-10:]) {
			t.Fatalf("ignoreRange=%v tail: err %v len %d", ign, err, len(b))
		}
	}
	if gotAuth.Load() != "Bearer t" {
		t.Fatal("Authorization not sent to the origin")
	}
}

func TestFetchRetriesThenSucceeds(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) < 3 {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		http.ServeContent(w, r, "", time.Time{}, strings.NewReader("hello world"))
	}))
	defer srv.Close()
	c := NewClient(Options{Backoff: time.Millisecond})
	b, size, err := fetchAll(t, c.Source(mustURL(srv.URL), nil, nil), 6, 5)
	if err != nil || string(b) != "world" || size != 11 {
		t.Fatalf("got %q size %d err %v", b, size, err)
	}
	if calls.Load() != 3 {
		t.Fatalf("%d calls, want 3", calls.Load())
	}
}

func TestFetchErrorsAreClear(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		switch r.URL.Path {
		case "/missing":
			http.NotFound(w, r)
		case "/auth":
			w.Header().Set("WWW-Authenticate", `Bearer realm="x"`)
			http.Error(w, "no", http.StatusUnauthorized)
		default:
			http.Error(w, "down", http.StatusBadGateway)
		}
	}))
	defer srv.Close()
	c := NewClient(Options{Backoff: time.Millisecond, Attempts: 3})
	_, _, err := fetchAll(t, c.Source(mustURL(srv.URL+"/missing"), nil, nil), 0, 10)
	if !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("404: %v", err)
	}
	calls.Store(0)
	_, _, err = fetchAll(t, c.Source(mustURL(srv.URL+"/auth"), nil, nil), 0, 10)
	var se *StatusError
	if !errors.As(err, &se) || se.Code != 401 || se.Header.Get("Www-Authenticate") == "" {
		t.Fatalf("401: %v", err)
	}
	if calls.Load() != 1 {
		t.Fatalf("401 retried %d times", calls.Load())
	}
	calls.Store(0)
	_, _, err = fetchAll(t, c.Source(mustURL(srv.URL+"/down?sig=SECRET"), nil, nil), 0, 10)
	if err == nil || calls.Load() != 3 {
		t.Fatalf("502: err %v after %d calls, want an error after 3", err, calls.Load())
	}
	if strings.Contains(err.Error(), "SECRET") {
		t.Fatalf("error leaks the query string: %v", err)
	}
}

func TestDialRefusesForbiddenAddresses(t *testing.T) {
	c := NewClient(Options{DialTimeout: time.Second, Attempts: 1})
	_, _, err := fetchAll(t, c.Source(mustURL("http://169.254.169.254/latest"), nil, nil), 0, 1)
	if !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("dial to link-local: %v, want ErrNotAllowed", err)
	}
}

func TestLearnedOrigins(t *testing.T) {
	l := NewLearned(2, time.Minute)
	now := time.Unix(1000, 0)
	l.now = func() time.Time { return now }
	c := NewClient(Options{})
	k1 := blob.Key("sha256:" + strings.Repeat("1", 64))
	k2 := blob.Key("sha256:" + strings.Repeat("2", 64))
	k3 := blob.Key("sha256:" + strings.Repeat("3", 64))
	l.Learn(k1, c.Source(mustURL("http://o/1"), nil, nil))
	l.Learn(k2, c.Source(mustURL("http://o/2"), nil, nil))
	l.Learn(blob.Key("url:"+strings.Repeat("4", 64)), c.Source(mustURL("http://o/4"), nil, nil))
	if l.Origin(k1) == nil || l.Origin(k2) == nil {
		t.Fatal("learned origins not returned")
	}
	l.Learn(k3, c.Source(mustURL("http://o/3"), nil, nil)) // evicts the least recently learned: k1
	if l.Origin(k1) != nil || l.Origin(k3) == nil {
		t.Fatal("bound not kept")
	}
	now = now.Add(2 * time.Minute)
	if l.Origin(k2) != nil {
		t.Fatal("stale origin returned")
	}
	var nilL *Learned
	nilL.Learn(k1, nil)
	if nilL.Origin(k1) != nil {
		t.Fatal("nil Learned returned sources")
	}
}
