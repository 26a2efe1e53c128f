package httpmirror

import (
	"bytes"
	"fmt"
	"net/http"
	"slices"
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

// A tag asked through the mirror path is resolved at the registry (the
// authority for tags): containers/image takes a whole image from the first
// source that answers the manifest, so a 404 there would send every blob to
// the registry. By ?ns= (containerd, which resolves tags itself) it stays a
// 404 and the registry is not asked.
func TestMirrorPathResolvesTagsAtTheRegistry(t *testing.T) {
	for _, headDigest := range []bool{true, false} {
		t.Run(fmt.Sprintf("digest-header=%v", headDigest), func(t *testing.T) {
			fx := newPTFixture(t)
			fx.reg.headDigest = headDigest
			m := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`)
			k := keyOf(m)
			fx.reg.blobs["lib/app/manifests/"+string(k)] = m
			fx.reg.blobs["lib/app/manifests/v1"] = m

			resp, _ := fx.get(t, "/v2/lib/app/manifests/v1?ns=registry.example")
			if resp.StatusCode != http.StatusNotFound {
				t.Fatalf("tag by ?ns=: status %d, want 404 (containerd resolves tags itself)", resp.StatusCode)
			}
			fx.reg.mu.Lock()
			asked := len(fx.reg.methods)
			fx.reg.mu.Unlock()
			if asked != 0 {
				t.Fatalf("a tag by ?ns= went to the registry: %v", fx.reg.methods)
			}

			const accept = "application/vnd.oci.image.manifest.v1+json"
			resp, body := fx.get(t, "/v2/peerd/registry.example/lib/app/manifests/v1", "Accept", accept)
			if resp.StatusCode != http.StatusOK || !bytes.Equal(body, m) {
				t.Fatalf("tag through the mirror path: status %d (%s)", resp.StatusCode, body)
			}
			if got := resp.Header.Get("Docker-Content-Digest"); got != string(k) {
				t.Fatalf("digest header %q, want %s", got, k)
			}
			fx.reg.mu.Lock()
			methods, accepts := slices.Clone(fx.reg.methods), slices.Clone(fx.reg.accepts)
			fx.reg.mu.Unlock()
			if methods[0] != "HEAD /v2/lib/app/manifests/v1" || accepts[0] != accept {
				t.Fatalf("registry saw %v with Accept %q, want a HEAD of the tag with the client's Accept", methods, accepts)
			}
			if want := !headDigest; slices.Contains(methods, "GET /v2/lib/app/manifests/v1") != want {
				t.Fatalf("registry saw %v: a GET of the tag only without a digest header", methods)
			}

			resp, body = fx.get(t, "/v2/peerd/registry.example/lib/app/manifests/v2")
			if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(body), "MANIFEST_UNKNOWN") {
				t.Fatalf("unknown tag: %d %s, want 404 MANIFEST_UNKNOWN", resp.StatusCode, body)
			}
			resp, _ = fx.get(t, "/v2/peerd/other.example/lib/app/manifests/v1")
			if resp.StatusCode != http.StatusNotFound {
				t.Fatalf("tag of a registry without pull-through: status %d, want 404", resp.StatusCode)
			}
		})
	}
}

// A registry that wants credentials for a tag gets its challenge relayed, and
// the client's token reaches it.
func TestMirrorPathTagRelaysTheChallenge(t *testing.T) {
	fx := newPTFixture(t)
	fx.reg.headDigest = true
	fx.reg.token = "s3cret"
	m := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`)
	fx.reg.blobs["lib/app/manifests/"+string(keyOf(m))] = m
	fx.reg.blobs["lib/app/manifests/v1"] = m
	resp, body := fx.get(t, "/v2/peerd/registry.example/lib/app/manifests/v1")
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("Www-Authenticate"), "auth.example") {
		t.Fatalf("without a token: %d %q %s, want the registry's 401 challenge", resp.StatusCode, resp.Header.Get("Www-Authenticate"), body)
	}
	resp, body = fx.get(t, "/v2/peerd/registry.example/lib/app/manifests/v1", "Authorization", "Bearer s3cret")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, m) {
		t.Fatalf("with the token: %d %s", resp.StatusCode, body)
	}
}
