package httpmirror

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"sync/atomic"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/internal/reliability"
	"github.com/peerd-project/peerd/upstream"
)

// The distribution spec's grammar, written out from the spec's text.
var (
	specName   = regexp.MustCompile(`^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$`)
	specTag    = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
	specDigest = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
)

const fuzzHex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

// FuzzParseBlobURL checks what a /blobs/ request target may name: an
// absolute http(s) URL without credentials or dot segments, whose key is
// the digest its path names (else the URL key), that re-parses to the same
// host the allow-list checked, and that an allow-list admits only for a
// host it names.
func FuzzParseBlobURL(f *testing.F) {
	for _, s := range []string{
		"/blobs/https://registry.example.com/v2/library/alpine/blobs/sha256:" + fuzzHex,
		"/blobs/https://acct.blob.core.windows.net/docker/registry/v2/blobs/sha256/e3/" + fuzzHex + "/data?sig=secret&se=2030",
		"/blobs/https://acct.blob.core.windows.net/docker/registry/v2/blobs/sha256/00/" + fuzzHex + "/data",
		"/blobs/http://127.0.0.1:5000/files/layer.tar",
		"/blobs/https://user:pw@registry.example.com/x",
		"/blobs/https://registry.example.com/a/../sha256:" + fuzzHex,
		"/blobs/https://registry.example.com/a/%2e%2e/b",
		"/blobs/https://registry.example.com:99999/x",
		"/blobs/https://registry.example.com/x#frag",
		"/blobs/ftp://registry.example.com/x",
		"/blobs/https:///x",
		"/blobs/https://registry.example.com@169.254.169.254/x",
		"/blobs/https://[::1]:8443/sha256:" + fuzzHex + "?x=1",
		"/blobs/https://registry.example.com/sha256:" + strings.ToUpper(fuzzHex),
		"http://peerd:30000/blobs/https://registry.example.com/x",
		"/blobs/HTTPS://Registry.Example.COM/x",
		"/blobs/", "/v2/", "",
	} {
		f.Add(s)
	}
	allow, err := upstream.ParseAllowList([]string{"registry.example.com,*.blob.core.windows.net:443,127.0.0.1:5000"})
	if err != nil {
		f.Fatal(err)
	}
	admits := func(host, port string) bool {
		return host == "registry.example.com" ||
			strings.HasSuffix(host, ".blob.core.windows.net") && len(host) > len(".blob.core.windows.net") && port == "443" ||
			host == "127.0.0.1" && port == "5000"
	}
	f.Fuzz(func(t *testing.T, target string) {
		u, key, err := ParseBlobURL(target)
		if err != nil {
			if u != nil || key != "" {
				t.Fatalf("ParseBlobURL(%q) failed (%v) but returned %v %q", target, err, u, key)
			}
			return
		}
		if u.Scheme != "http" && u.Scheme != "https" || u.Hostname() == "" || u.User != nil || u.Fragment != "" || u.Opaque != "" {
			t.Fatalf("ParseBlobURL(%q) accepted %#v", target, u)
		}
		if p := u.Port(); p != "" {
			if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
				t.Fatalf("ParseBlobURL(%q) accepted port %q", target, p)
			}
		}
		if path, err := url.PathUnescape(u.EscapedPath()); err == nil {
			for _, seg := range strings.Split(path, "/") {
				if seg == "." || seg == ".." {
					t.Fatalf("ParseBlobURL(%q) accepted dot segment in %q", target, path)
				}
			}
		}
		switch key.Algorithm() {
		case blob.AlgSHA256:
			if !specDigest.MatchString(string(key)) {
				t.Fatalf("ParseBlobURL(%q) key %q", target, key)
			}
			path, _ := url.PathUnescape(u.EscapedPath())
			h := key.Hex()
			if !strings.Contains(path, "sha256:"+h) && !strings.Contains(u.EscapedPath(), "/sha256/"+h[:2]+"/"+h) {
				t.Fatalf("ParseBlobURL(%q) key %q is not named in path %q", target, key, u.EscapedPath())
			}
		case blob.AlgURL:
			if key != blob.FromURL(u) {
				t.Fatalf("ParseBlobURL(%q) key %q, want %q", target, key, blob.FromURL(u))
			}
		default:
			t.Fatalf("ParseBlobURL(%q) key %q", target, key)
		}
		// Round trip: the URL the origin is fetched with parses to the same
		// URL and key, and the client dials the host that was checked.
		u2, key2, err := ParseBlobURL("/blobs/" + u.String())
		if err != nil || u2.String() != u.String() || key2 != key {
			t.Fatalf("round trip of %q via %q: %v %q %v", target, u.String(), u2, key2, err)
		}
		again, err := url.Parse(u.String())
		if err != nil || again.Hostname() != u.Hostname() || again.Port() != u.Port() {
			t.Fatalf("%q re-parses to %v (%v), checked host %q port %q", u.String(), again, err, u.Hostname(), u.Port())
		}
		if allow.Check(u) == nil {
			port := u.Port()
			if port == "" {
				port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
			}
			if !admits(strings.ToLower(u.Hostname()), port) {
				t.Fatalf("allow-list admitted %q (host %q port %q)", target, u.Hostname(), port)
			}
		}
	})
}

// FuzzParseRange checks an accepted Range header names bytes inside the
// blob, and that the Content-Range answered for it round-trips.
func FuzzParseRange(f *testing.F) {
	for _, s := range []struct {
		h    string
		size int64
	}{
		{"bytes=0-99", 1000}, {"bytes=100-", 1000}, {"bytes=-100", 1000}, {"bytes=-2000", 1000},
		{"bytes=999-999", 1000}, {"bytes=1000-", 1000}, {"bytes=0-", 0}, {"bytes=-0", 10},
		{"bytes=0-9223372036854775807", 5}, {"bytes=9223372036854775807-", 9223372036854775807},
		{"bytes=-9223372036854775808", 10}, {"bytes= 1 - 2 ", 10}, {"bytes=1-2,3-4", 10},
		{"bytes=5-4", 10}, {"items=0-1", 10}, {"bytes=+1-2", 10}, {"bytes=-", 10}, {"", 10},
	} {
		f.Add(s.h, s.size)
	}
	f.Fuzz(func(t *testing.T, h string, size int64) {
		if size < 0 {
			size = -(size + 1)
		}
		off, n, partial, err := parseRange(h, size)
		if err != nil {
			return
		}
		if !partial {
			if h != "" || off != 0 || n != size {
				t.Fatalf("parseRange(%q, %d) = whole blob %d+%d", h, size, off, n)
			}
			return
		}
		end := off + n - 1
		if off < 0 || n < 1 || n > size || end < off || end >= size {
			t.Fatalf("parseRange(%q, %d) = off %d n %d: outside the blob", h, size, off, n)
		}
		canon := fmt.Sprintf("bytes=%d-%d", off, end)
		if o2, n2, p2, err := parseRange(canon, size); err != nil || o2 != off || n2 != n || !p2 {
			t.Fatalf("round trip %q: %d %d %v %v", canon, o2, n2, p2, err)
		}
	})
}

// FuzzParseOCIPath checks an accepted /v2/ path names a repository the
// distribution spec allows, a digest of the accepted form or a valid tag,
// and that the path rebuilt from its parts parses the same.
func FuzzParseOCIPath(f *testing.F) {
	for _, s := range []string{
		"/v2/library/alpine/manifests/3.20",
		"/v2/library/alpine/manifests/sha256:" + fuzzHex,
		"/v2/library/alpine/blobs/sha256:" + fuzzHex,
		"/v2/a/b/c/d/blobs/sha256:" + fuzzHex,
		"/v2/library/alpine/blobs/latest",
		"/v2/Library/alpine/manifests/latest",
		"/v2/library//alpine/manifests/latest",
		"/v2/library/alpine/manifests/.hidden",
		"/v2/library/alpine/manifests/sha256:" + strings.ToUpper(fuzzHex),
		"/v2/library/alpine/manifests/sha512:" + fuzzHex + fuzzHex,
		"/v2/library/alpine/tags/list",
		"/v2/../../etc/manifests/latest",
		"/v2/a--b__c.d/manifests/" + strings.Repeat("t", 129),
		"/v2/" + strings.Repeat("a/", 130) + "manifests/x",
		"/v2/manifests/latest", "/v2/", "/v2/x",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		req, code, msg := parseOCIPath(p)
		if code != "" {
			if msg == "" {
				t.Fatalf("parseOCIPath(%q): code %s without a message", p, code)
			}
			return
		}
		if len(req.name) > 255 || !specName.MatchString(req.name) {
			t.Fatalf("parseOCIPath(%q) accepted name %q", p, req.name)
		}
		switch {
		case req.key != "":
			if !specDigest.MatchString(string(req.key)) || string(req.key) != req.ref {
				t.Fatalf("parseOCIPath(%q) accepted digest %q (ref %q)", p, req.key, req.ref)
			}
		case req.kind != "manifests" || !specTag.MatchString(req.ref):
			t.Fatalf("parseOCIPath(%q) accepted %s reference %q", p, req.kind, req.ref)
		}
		again, code, _ := parseOCIPath("/v2/" + req.name + "/" + req.kind + "/" + req.ref)
		if code != "" || again != req {
			t.Fatalf("round trip of %q: %+v %s, want %+v", p, again, code, req)
		}
	})
}

// FuzzOCIRequest sends arbitrary /v2/ paths, ?ns= values and Range
// headers to the mirror (its store holds one blob and one tagged
// manifest): every answer is a success, a 4xx with an OCI error body, or
// a 416; a 206 names a range inside the blob; a pull-through origin is
// only ever the base URL configured for the registry ?ns= names.
func FuzzOCIRequest(f *testing.F) {
	layer := bytes.Repeat([]byte("layer"), 100)
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}`)
	lk, mk := keyOf(layer), keyOf(manifest)
	store := &fakeStore{
		blobs: map[blob.Key][]byte{lk: layer, mk: manifest},
		types: map[blob.Key]string{},
		tags:  map[string]blob.Key{"docker.io/library/alpine:3.20": mk},
	}
	bases := map[string]string{"docker.io": "https://registry-1.docker.io", "127.0.0.1:5000": "http://127.0.0.1:5000"}
	h := NewOCI(OCIConfig{
		Local:       store,
		Registries:  []string{"docker.io"},
		PullThrough: bases,
		Upstream:    upstream.NewClient(upstream.Options{}),
		Logger:      slog.New(slog.NewTextHandler(io.Discard, nil)),
	}).(*ociHandler)
	for _, s := range [][3]string{
		{"/v2/library/alpine/blobs/" + string(lk), "ns=docker.io", "bytes=10-19"},
		{"/v2/library/alpine/blobs/" + string(lk), "ns=docker.io", "bytes=-5"},
		{"/v2/library/alpine/blobs/" + string(lk), "", "bytes=500-"},
		{"/v2/library/alpine/manifests/3.20", "ns=docker.io", ""},
		{"/v2/library/alpine/manifests/3.20", "ns=DOCKER.IO&ns=evil.net", ""},
		{"/v2/library/alpine/manifests/3.20", "ns=evil.net", ""},
		{"/v2/library/alpine/manifests/" + string(mk), "ns=127.0.0.1:5000", ""},
		{"/v2/library/alpine/blobs/sha256:" + fuzzHex, "ns=127.0.0.1%3A5000", ""},
		{"/v2/library/alpine/blobs/sha256:" + fuzzHex, "ns=%zz", ""},
		{"/v2/", "", ""},
		{"/v2/x/y/z", "", ""},
	} {
		f.Add(s[0], s[1], s[2])
	}
	var replayed atomic.Int64
	reliability.RecordFuzz(f, &replayed, "FuzzOCIRequest", "found 404 bodies that were not JSON (Go %q escapes for a control character in ?ns=); every 4xx now carries a JSON OCI error")
	f.Fuzz(func(t *testing.T, path, query, rng string) {
		replayed.Add(1)
		u := &url.URL{Path: path, RawQuery: query}
		r := httptest.NewRequest(http.MethodGet, "/v2/", nil)
		r.URL, r.RequestURI = u, u.RequestURI()
		if rng != "" {
			r.Header.Set("Range", rng)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		res := w.Result()
		body := w.Body.Bytes()
		switch res.StatusCode {
		case http.StatusOK:
		case http.StatusPartialContent:
			var a, b, size int64
			if _, err := fmt.Sscanf(res.Header.Get("Content-Range"), "bytes %d-%d/%d", &a, &b, &size); err != nil ||
				a < 0 || b < a || b >= size || size != int64(len(layer)) || int64(len(body)) != b-a+1 ||
				!bytes.Equal(body, layer[a:b+1]) {
				t.Fatalf("%q Range %q: 206 with Content-Range %q and %d bytes", path, rng, res.Header.Get("Content-Range"), len(body))
			}
		case http.StatusRequestedRangeNotSatisfiable:
			if rng == "" {
				t.Fatalf("%q: 416 without a Range header", path)
			}
		case http.StatusBadRequest, http.StatusNotFound:
			var e struct {
				Errors []struct{ Code, Message string } `json:"errors"`
			}
			if err := json.Unmarshal(body, &e); err != nil || len(e.Errors) == 0 || e.Errors[0].Code == "" {
				t.Fatalf("%q: %d with body %q", path, res.StatusCode, body)
			}
		default:
			t.Fatalf("%q ?%s Range %q: status %d", path, query, rng, res.StatusCode)
		}
		if res.StatusCode == http.StatusOK && cl(res) != int64(len(body)) {
			t.Fatalf("%q: Content-Length %d, body %d bytes", path, cl(res), len(body))
		}

		for _, kind := range []string{"blobs", "manifests"} {
			o := h.origin(r, blob.Key("sha256:"+fuzzHex), kind, nil)
			if o == nil {
				continue
			}
			base := bases[strings.ToLower(r.URL.Query().Get("ns"))]
			got, err := url.Parse(fmt.Sprint(o))
			want, _ := url.Parse(base)
			req, code, _ := parseOCIPath(path)
			if base == "" || code != "" || err != nil || got.Scheme != want.Scheme || got.Host != want.Host ||
				got.Path != "/v2/"+req.name+"/"+kind+"/sha256:"+fuzzHex || got.RawQuery != "" {
				t.Fatalf("%q ?%s: pull-through origin %v (ns base %q)", path, query, o, base)
			}
		}
	})
}

func cl(res *http.Response) int64 {
	n, _ := strconv.ParseInt(res.Header.Get("Content-Length"), 10, 64)
	return n
}
