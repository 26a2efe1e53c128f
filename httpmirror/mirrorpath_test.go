package httpmirror

import (
	"bytes"
	"net/http"
	"strings"
	"testing"
)

// containers-registries.conf mirrors name the registry in the path
// (<mirror>/peerd/<registry>): the same pull-through and cache as ?ns=, and
// a registry the mirror does not serve is a 404 with an OCI error, so the
// client falls through to the registry itself.
func TestMirrorPathNamesTheRegistry(t *testing.T) {
	fx := newPTFixture(t)
	data := randBytes(t, 200<<10+3)
	k := keyOf(data)
	fx.reg.blobs["lib/app/blobs/"+string(k)] = data

	resp, body := fx.get(t, "/v2/peerd/registry.example/lib/app/blobs/"+string(k))
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
		t.Fatalf("blob through the mirror path: status %d, %d bytes", resp.StatusCode, len(body))
	}
	sent := fx.reg.bytes.Load()
	// The same blob by ?ns= comes from the cache the path filled.
	resp, body = fx.get(t, "/v2/lib/app/blobs/"+string(k)+"?ns=registry.example")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) || fx.reg.bytes.Load() != sent {
		t.Fatalf("then by ?ns=: status %d, registry sent %d more bytes", resp.StatusCode, fx.reg.bytes.Load()-sent)
	}
	for _, tc := range []struct{ path, code string }{
		{"/v2/peerd/unlisted.example/lib/app/blobs/" + string(k), "NAME_UNKNOWN"},
		{"/v2/peerd/registry.example/", "UNSUPPORTED"},
		{"/v2/peerd/registry.example/lib/app/blobs/sha256:xyz", "DIGEST_INVALID"},
	} {
		resp, body := fx.get(t, tc.path)
		if resp.StatusCode/100 != 4 || !strings.Contains(string(body), tc.code) {
			t.Errorf("GET %s: %d %s, want a 4xx with %s", tc.path, resp.StatusCode, body, tc.code)
		}
	}
	// A repository really named peerd/... keeps working with ?ns=.
	if reg, _, ok := mirrorPath(mustReq(t, "/v2/peerd/x/y/blobs/d?ns=docker.io")); ok {
		t.Fatalf("a ?ns= request taken as a mirror path (registry %q)", reg)
	}
}

func mustReq(t *testing.T, target string) *http.Request {
	t.Helper()
	r, err := http.NewRequest(http.MethodGet, "http://m"+target, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestMirrorPathNameIsOneReferenceComponent(t *testing.T) {
	for in, want := range map[string]string{"docker.io": "docker.io", "10.0.0.5:5000": "10.0.0.5-5000", "[FD00::1]:5000": "fd00--1-5000", "Ghcr.IO": "ghcr.io"} {
		got := MirrorPathName(in)
		if got != want || !nameRE.MatchString(got) {
			t.Errorf("MirrorPathName(%q) = %q (valid component: %v), want %q", in, got, nameRE.MatchString(got), want)
		}
	}
}
