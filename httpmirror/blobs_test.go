package httpmirror

import (
	"strings"
	"testing"

	"github.com/peerd-project/peerd/blob"
)

func TestParseRange(t *testing.T) {
	const size = 1000
	for _, tc := range []struct {
		h       string
		off, n  int64
		partial bool
		ok      bool
	}{
		{"", 0, size, false, true},
		{"bytes=0-0", 0, 1, true, true},
		{"bytes=0-999", 0, 1000, true, true},
		{"bytes=10-5000", 10, 990, true, true},
		{"bytes=500-", 500, 500, true, true},
		{"bytes=-10", 990, 10, true, true},
		{"bytes=-5000", 0, 1000, true, true},
		{"bytes=1000-", 0, 0, false, false},
		{"bytes=1000-1001", 0, 0, false, false},
		{"bytes=5-4", 0, 0, false, false},
		{"bytes=-0", 0, 0, false, false},
		{"bytes=0-1,5-6", 0, 0, false, false},
		{"items=0-1", 0, 0, false, false},
		{"bytes=a-b", 0, 0, false, false},
		{"bytes=-", 0, 0, false, false},
	} {
		off, n, partial, err := parseRange(tc.h, size)
		if (err == nil) != tc.ok || (tc.ok && (off != tc.off || n != tc.n || partial != tc.partial)) {
			t.Errorf("parseRange(%q) = %d, %d, %v, %v", tc.h, off, n, partial, err)
		}
	}
}

func TestParseBlobURL(t *testing.T) {
	hex := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		uri     string
		wantURL string
		key     blob.Key // "" = url-keyed
		ok      bool
	}{
		{"/blobs/https://acct.blob.core.example.net/c/docker/registry/v2/blobs/sha256/ab/" + hex + "/data?se=2030&sig=abc%2Fdef",
			"https://acct.blob.core.example.net/c/docker/registry/v2/blobs/sha256/ab/" + hex + "/data?se=2030&sig=abc%2Fdef", blob.Key("sha256:" + hex), true},
		{"/blobs/https://s.example.net/id//docker/registry/v2/blobs/sha256/ab/" + hex + "/data",
			"https://s.example.net/id//docker/registry/v2/blobs/sha256/ab/" + hex + "/data", blob.Key("sha256:" + hex), true},
		{"/blobs/https://registry.example.com/v2/lib/x/blobs/sha256:" + hex,
			"https://registry.example.com/v2/lib/x/blobs/sha256:" + hex, blob.Key("sha256:" + hex), true},
		{"/blobs/http://127.0.0.1:8080/files/model.bin?token=1", "http://127.0.0.1:8080/files/model.bin?token=1", "", true},
		// storage path whose 2-hex folder does not match the digest: not a digest
		{"/blobs/https://s.example.net/sha256/cd/" + hex + "/data", "https://s.example.net/sha256/cd/" + hex + "/data", "", true},
		// a digest inside another path segment names nothing
		{"/blobs/https://registry.example.com/v2/x/blobs/xsha256:" + hex, "https://registry.example.com/v2/x/blobs/xsha256:" + hex, "", true},
		// dot segments could make the origin serve another file under the digest's key
		{"/blobs/https://s.example.net/sha256/ab/" + hex + "/data/../../../../other", "", "", false},
		{"/blobs/https://s.example.net/a/%2e%2e/sha256/ab/" + hex + "/data", "", "", false},
		{"/blobs/https://s.example.net/./x", "", "", false},
		{"/blobs/ftp://example.com/x", "", "", false},
		{"/blobs/example.com/x", "", "", false},
		{"/blobs/https:///x", "", "", false},
		{"/blobs/https://user:pw@example.com/x", "", "", false},
		{"/blobs/https://example.com:99999/x", "", "", false},
		{"/blobs/https://example.com/x#frag", "", "", false},
		{"/blobs/", "", "", false},
		{"/blobs/%zz", "", "", false},
	} {
		u, key, err := ParseBlobURL(tc.uri)
		if (err == nil) != tc.ok {
			t.Errorf("ParseBlobURL(%q) error %v, want ok=%v", tc.uri, err, tc.ok)
			continue
		}
		if !tc.ok {
			continue
		}
		if u.String() != tc.wantURL {
			t.Errorf("ParseBlobURL(%q) url = %s, want %s", tc.uri, u, tc.wantURL)
		}
		if tc.key != "" && key != tc.key {
			t.Errorf("ParseBlobURL(%q) key = %s, want %s", tc.uri, key, tc.key)
		}
		if tc.key == "" && key.Algorithm() != blob.AlgURL {
			t.Errorf("ParseBlobURL(%q) key = %s, want a url key", tc.uri, key)
		}
	}
	// A refusal never echoes the query string (a signature) or credentials.
	for _, uri := range []string{"/blobs/http://h/%zz?sig=SECRET", "/blobs/ftp://u:SECRET@h/x?sig=SECRET", "/blobs/http://h/a/../b?sig=SECRET",
		"/blobs/http://h/x?sig=SECRET#SECRET"} {
		if _, _, err := ParseBlobURL(uri); err == nil || strings.Contains(err.Error(), "SECRET") {
			t.Errorf("ParseBlobURL(%q) = %v, want an error without the secret", uri, err)
		}
	}
	// The query is not part of a url key.
	_, k1, _ := ParseBlobURL("/blobs/http://h/f?sig=1")
	_, k2, _ := ParseBlobURL("/blobs/http://h/f?sig=2")
	_, k3, _ := ParseBlobURL("/blobs/http://h/g?sig=1")
	if k1 != k2 || k1 == k3 {
		t.Errorf("url keys: %s %s %s", k1, k2, k3)
	}
}
