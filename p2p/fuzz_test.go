package p2p

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	ds "github.com/ipfs/go-datastore"
	dsq "github.com/ipfs/go-datastore/query"

	"github.com/peerd-project/peerd/blob"
)

const fuzzHex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

// FuzzParsePeerRange checks the Range header of a peer's request: an
// accepted one names a non-negative offset and a positive length (or "to
// the end") whose last byte does not overflow, and what GetRange sends for
// it parses back to the same offset and length.
func FuzzParsePeerRange(f *testing.F) {
	for _, s := range []string{
		"bytes=0-1048575", "bytes=1048576-", "bytes=0-0", "bytes=5-4", "bytes=-5", "bytes=0-9223372036854775807",
		"bytes=1-9223372036854775807", "bytes=9223372036854775807-", "bytes=0-1,2-3", "bytes= 0-1", "bytes=+1-2",
		"bytes=", "bytes=-", "items=0-1", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, h string) {
		off, n, err := parsePeerRange(h)
		if err != nil {
			return
		}
		if off < 0 || n == 0 || n < -1 || n > 0 && off+n-1 < off {
			t.Fatalf("parsePeerRange(%q) = off %d n %d", h, off, n)
		}
		if h == "" {
			if off != 0 || n != -1 {
				t.Fatalf("no header: off %d n %d, want the whole blob", off, n)
			}
			return
		}
		canon := fmt.Sprintf("bytes=%d-", off) // as GetRange formats it
		if n >= 0 {
			canon = fmt.Sprintf("bytes=%d-%d", off, off+n-1)
		}
		if o2, n2, err := parsePeerRange(canon); err != nil || o2 != off || n2 != n {
			t.Fatalf("round trip of %q via %q: %d %d %v", h, canon, o2, n2, err)
		}
	})
}

// FuzzTagName checks image names: an accepted one has a registry host, a
// repository the distribution spec allows and a valid tag, and its string
// form parses back to the same reference and DHT key.
func FuzzTagName(f *testing.F) {
	for _, s := range []string{
		"docker.io/library/alpine:3.20", "127.0.0.1:5000/team/app:v1.0.0-rc.1", "ghcr.io/org/app@sha256:" + fuzzHex,
		"DOCKER.IO/library/alpine:latest", "docker.io/Library/alpine:latest", "docker.io/library/alpine",
		"docker.io/library/alpine:", "docker.io/:tag", "localhost:99999/a:b", "-bad.io/a:b", "docker.io/a//b:c",
		"docker.io/a:" + strings.Repeat("t", 129), "docker.io/a/b:c:d", "a/b:c\n",
	} {
		f.Add(s)
	}
	specName := regexp.MustCompile(`^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$`)
	specTag := regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseTagName(s)
		if err != nil {
			return
		}
		if r.Registry == "" || r.Registry != strings.ToLower(r.Registry) || strings.ContainsAny(r.Registry, "/@ ") ||
			len(r.Repo) > 255 || !specName.MatchString(r.Repo) || !specTag.MatchString(r.Tag) {
			t.Fatalf("ParseTagName(%q) accepted %+v", s, r)
		}
		if r.String() != strings.ToLower(s[:len(r.Registry)])+s[len(r.Registry):] {
			t.Fatalf("ParseTagName(%q) = %q", s, r)
		}
		r2, err := ParseTagName(r.String())
		if err != nil || r2 != r || !TagCID(r2).Equals(TagCID(r)) {
			t.Fatalf("round trip of %q: %+v %v", s, r2, err)
		}
		if _, err := CIDToKey(TagCID(r)); err == nil {
			t.Fatalf("the tag key of %q decodes as a blob key", s)
		}
	})
}

// FuzzTagAnswer checks both sides of a /tags/ exchange. A node answers a
// request only for a well-formed tag of a listed registry, asks its store
// for exactly that tag, and sends an answer the asker accepts. An asker
// accepts (TagTarget.check) only a digest of the accepted form and a
// manifest size in range, and what it accepts round-trips through JSON.
func FuzzTagAnswer(f *testing.F) {
	for _, s := range []struct{ path, body string }{
		{"/tags/docker.io/library/alpine:3.20", `{"digest":"sha256:` + fuzzHex + `","size":1234,"updated":"2026-01-02T03:04:05Z"}`},
		{"/tags/ghcr.io/org/app:v1", `{"digest":"sha256:` + strings.ToUpper(fuzzHex) + `","size":1}`},
		{"/tags/evil.net/x:y", `{"digest":"url:` + fuzzHex + `","size":1}`},
		{"/tags/docker.io/a:b", `{"digest":"sha256:` + fuzzHex + `","size":4194305}`},
		{"/tags/docker.io/a:b", `{"digest":"sha256:` + fuzzHex + `","size":-1}`},
		{"/tags/docker.io/a@sha256:" + fuzzHex, `{"digest":"sha256:` + fuzzHex + `\n","size":1}`},
		{"/tags/docker.io/../../x:y", `{"digest":null,"size":1e400}`},
		{"/tags/DOCKER.IO/a:b", `[]`},
	} {
		f.Add(s.path, []byte(s.body))
	}
	tags := newTags(nil, TagOptions{Registries: []string{"docker.io", "ghcr.io"}})
	f.Fuzz(func(t *testing.T, path string, body []byte) {
		// The asking side.
		var tt TagTarget
		if json.Unmarshal(body, &tt) == nil && tt.check() == nil {
			if _, err := blob.ParseDigest(string(tt.Digest)); err != nil || tt.Size <= 0 || tt.Size > maxManifestSize {
				t.Fatalf("accepted answer %q: %+v", body, tt)
			}
			b, _ := json.Marshal(tt)
			var again TagTarget
			if err := json.Unmarshal(b, &again); err != nil || again.Digest != tt.Digest || again.Size != tt.Size ||
				again.MediaType != tt.MediaType || !again.Updated.Equal(tt.Updated) {
				t.Fatalf("answer %q does not round-trip: %s", body, b)
			}
		}

		// The answering side, with a store that holds every tag it is asked for.
		if !strings.HasPrefix(path, "/tags/") {
			return
		}
		var asked []TagRef
		tags.opts.Local = func(_ context.Context, r TagRef) (TagTarget, error) {
			asked = append(asked, r)
			return TagTarget{Digest: blob.Key("sha256:" + fuzzHex), Size: 7, Updated: time.Unix(1, 0)}, nil
		}
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.URL.Path, r.URL.RawPath = path, ""
		w := httptest.NewRecorder()
		tags.answer(w, r, "")
		ref, err := ParseTagName(strings.TrimPrefix(path, "/tags/"))
		switch w.Code {
		case http.StatusOK:
			if err != nil || !tags.Listed(ref.Registry) || len(asked) != 1 || asked[0] != ref {
				t.Fatalf("%q answered 200 (parse %v, asked %v)", path, err, asked)
			}
			var got TagTarget
			if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil || got.check() != nil {
				t.Fatalf("%q: answer %q is not one an asker accepts", path, w.Body.Bytes())
			}
		case http.StatusBadRequest:
			if err == nil {
				t.Fatalf("%q refused as bad, but it parses as %v", path, ref)
			}
		case http.StatusNotFound:
			if err != nil || tags.Listed(ref.Registry) || len(asked) != 0 {
				t.Fatalf("%q: 404 (parse %v, asked %v)", path, err, asked)
			}
		default:
			t.Fatalf("%q: status %d", path, w.Code)
		}
	})
}

// FuzzBlobCID checks the DHT name of a blob: a CID from the network that
// CIDToKey accepts gives a digest of the accepted form whose own CID is the
// same, and every digest maps to a CID that maps back.
func FuzzBlobCID(f *testing.F) {
	c, _ := KeyToCID(blob.Key("sha256:" + fuzzHex))
	f.Add(c.Bytes())
	f.Add(TagCID(TagRef{"docker.io", "library/alpine", "3.20"}).Bytes())
	f.Add([]byte{0x01, 0x55, 0x12, 0x20})
	f.Add([]byte{0x12, 0x20, 0xe3, 0xb0})
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) == 32 {
			k := blob.Key(fmt.Sprintf("sha256:%x", b))
			c, err := KeyToCID(k)
			if err != nil {
				t.Fatalf("KeyToCID(%s): %v", k, err)
			}
			if k2, err := CIDToKey(c); err != nil || k2 != k {
				t.Fatalf("round trip of %s: %s %v", k, k2, err)
			}
		}
		_, c, err := cid.CidFromBytes(b)
		if err != nil {
			return
		}
		k, err := CIDToKey(c)
		if err != nil {
			return
		}
		if _, err := blob.ParseDigest(string(k)); err != nil {
			t.Fatalf("CIDToKey(%x) = %q", b, k)
		}
		c2, err := KeyToCID(k)
		if err != nil || !slices.Equal(c2.Hash(), c.Hash()) {
			t.Fatalf("CID %x gives %s whose CID is %v (%v)", b, k, c2, err)
		}
	})
}

// FuzzRecordStore runs a script of puts, deletes, gets and prefix queries
// (one per line: "p<key>", "d<key>", "g<key>", "q<prefix>") against the
// provider record store and go-datastore's map datastore, and wants the
// same answers from both and a record count that matches.
func FuzzRecordStore(f *testing.F) {
	f.Add("p/providers/K1/P1\np/providers/K1/P2\nq/providers/K1\nd/providers/K1/P1\nq/providers\ng/providers/K1/P2")
	f.Add("p/a\np/a/b\np/a/b/c\nd/a/b\nq/a\nq/a/b\nq/\nq\nqa")
	f.Add("p//x//y/\np/./x/../y\nq/x/\ng/y\nd/x/y\nq")
	f.Add("p/providers/K1\nq/providers/K\nq/providers/K1/\nqproviders/K1")
	f.Fuzz(func(t *testing.T, script string) {
		ctx := context.Background()
		ours, ref := newRecordStore(1<<20, nil, nil), ds.NewMapDatastore()
		lines := strings.Split(script, "\n")
		if len(lines) > 200 {
			lines = lines[:200]
		}
		for i, line := range lines {
			if line == "" {
				continue
			}
			op, arg := line[0], line[1:]
			k := ds.NewKey(arg)
			switch op {
			case 'p':
				v := []byte(fmt.Sprint(i))
				if err := ours.Put(ctx, k, v); err != nil {
					t.Fatalf("Put(%s): %v", k, err)
				}
				ref.Put(ctx, k, v)
			case 'd':
				ours.Delete(ctx, k)
				ref.Delete(ctx, k)
			case 'g':
				gv, gerr := ours.Get(ctx, k)
				wv, werr := ref.Get(ctx, k)
				if string(gv) != string(wv) || (gerr == nil) != (werr == nil) {
					t.Fatalf("line %d: Get(%s) = %q, %v; want %q, %v", i, k, gv, gerr, wv, werr)
				}
				gh, _ := ours.Has(ctx, k)
				wh, _ := ref.Has(ctx, k)
				if gh != wh {
					t.Fatalf("line %d: Has(%s) = %v, want %v", i, k, gh, wh)
				}
			case 'q':
				got, want := queryKeys(t, ours, dsq.Query{Prefix: arg}), queryKeys(t, ref, dsq.Query{Prefix: arg})
				if !slices.Equal(got, want) {
					t.Fatalf("line %d: prefix %q:\n got %v\nwant %v", i, arg, got, want)
				}
			}
		}
		if n := len(queryKeys(t, ref, dsq.Query{})); ours.n != n {
			t.Fatalf("store counts %d records, holds %d", ours.n, n)
		}
	})
}
