package p2p

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"
	"github.com/peerd-project/peerd/blob"
)

func digestOf(s string) blob.Key {
	sum := sha256.Sum256([]byte(s))
	return blob.Key("sha256:" + hex.EncodeToString(sum[:]))
}

func TestTagCID(t *testing.T) {
	r := TagRef{"docker.io", "library/alpine", "3.20"}
	c := TagCID(r)
	if !c.Equals(TagCID(r)) {
		t.Fatal("TagCID is not deterministic")
	}
	for _, other := range []TagRef{{"docker.io", "library/alpine", "3.21"}, {"ghcr.io", "library/alpine", "3.20"}, {"docker.io", "library/alpine2", "3.20"}} {
		if TagCID(other).Equals(c) {
			t.Fatalf("%s and %s share a key", r, other)
		}
	}
	dec, err := multihash.Decode(c.Hash())
	if err != nil || dec.Code != multihash.SHA3_256 || len(dec.Digest) != 32 {
		t.Fatalf("tag multihash %v %v, want sha3-256", dec, err)
	}
	// The DHT keys records by multihash: no blob key may ever share one,
	// not even a blob whose bytes are exactly what the tag key hashes.
	if _, err := CIDToKey(c); err == nil {
		t.Fatal("a tag key decodes as a blob key")
	}
	for _, content := range []string{r.String(), tagKeyDomain + r.String(), ""} {
		bc, err := KeyToCID(digestOf(content))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(bc.Hash(), c.Hash()) {
			t.Fatalf("blob of %q collides with the tag key", content)
		}
		bdec, _ := multihash.Decode(bc.Hash())
		if bdec.Code == dec.Code {
			t.Fatal("blob and tag keys use the same hash function code")
		}
	}
}

func TestParseTagName(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want TagRef
		ok   bool
	}{
		{"docker.io/library/alpine:3.20", TagRef{"docker.io", "library/alpine", "3.20"}, true},
		{"127.0.0.1:5000/team/app:v1", TagRef{"127.0.0.1:5000", "team/app", "v1"}, true},
		{"GHCR.io/org/x:Latest_1", TagRef{"ghcr.io", "org/x", "Latest_1"}, true},
		{"docker.io/library/alpine@sha256:" + digestOf("x").Hex(), TagRef{}, false},
		{"docker.io/library/alpine:3.20@sha256:" + digestOf("x").Hex(), TagRef{}, false},
		{"docker.io/library/alpine", TagRef{}, false},
		{"sha256:" + digestOf("x").Hex(), TagRef{}, false},
		{"docker.io/Library/alpine:1", TagRef{}, false},
		{"docker.io/a/../b:1", TagRef{}, false},
		{"docker.io/a:", TagRef{}, false},
		{"docker.io/a:-x", TagRef{}, false},
		{"bad_host/a:1", TagRef{}, false},
		{"/a:1", TagRef{}, false},
	} {
		got, err := ParseTagName(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseTagName(%q) = %v, %v; want %v ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
		if tc.ok && got.String() != fmt.Sprintf("%s/%s:%s", tc.want.Registry, tc.want.Repo, tc.want.Tag) {
			t.Errorf("String() = %q", got.String())
		}
	}
}

type fakeTagNet struct {
	mu       sync.Mutex
	provided map[string]int
	fail     bool
	finds    int
	provs    []peer.AddrInfo
	answers  map[peer.ID]TagTarget
	errs     map[peer.ID]error
}

func newFakeTags(t *testing.T, registries ...string) (*Tags, *fakeTagNet) {
	f := &fakeTagNet{provided: map[string]int{}, answers: map[peer.ID]TagTarget{}, errs: map[peer.ID]error{}}
	tg := newTags(nil, TagOptions{Registries: registries, FindTimeout: time.Second, AskTimeout: time.Second})
	tg.ads.provide = func(ctx context.Context, c cid.Cid) error {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.fail {
			return errors.New("no route")
		}
		f.provided[c.String()]++
		return nil
	}
	tg.ads.canRun = func() bool { return true }
	tg.find = func(ctx context.Context, c cid.Cid) []peer.AddrInfo {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.finds++
		return f.provs
	}
	tg.ask = func(ctx context.Context, ai peer.AddrInfo, r TagRef) (TagTarget, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		if err := f.errs[ai.ID]; err != nil {
			return TagTarget{}, err
		}
		tt, ok := f.answers[ai.ID]
		if !ok {
			return TagTarget{}, fmt.Errorf("peer %s: %w", ai.ID, blob.ErrNotFound)
		}
		return tt, nil
	}
	return tg, f
}

func (f *fakeTagNet) count(r TagRef) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.provided[TagCID(r).String()]
}

func TestTagsAdvertiseOnlyListedAndStopOnRemoval(t *testing.T) {
	tg, f := newFakeTags(t, "docker.io", "127.0.0.1:5000")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); tg.ads.run(ctx) }()
	defer func() { cancel(); <-done }()

	a := TagRef{"docker.io", "library/alpine", "3.20"}
	b := TagRef{"127.0.0.1:5000", "team/app", "v1"}
	foreign := TagRef{"quay.io", "x/y", "1"}
	tg.Set([]TagRef{a, b, foreign})
	waitFor(t, "both listed tags provided", func() bool { return f.count(a) == 1 && f.count(b) == 1 })
	if got := tg.Held(); len(got) != 2 || got[0] != b || got[1] != a {
		t.Fatalf("held %v, want only the listed registries' tags", got)
	}
	if f.count(foreign) != 0 {
		t.Fatal("a tag of an unlisted registry was advertised")
	}

	// The image of a is deleted: a is no longer re-advertised.
	tg.Set([]TagRef{b})
	tg.ads.mu.Lock()
	_, still := tg.ads.keys[a]
	for _, st := range tg.ads.keys {
		st.due = time.Time{} // everything due again at once
	}
	tg.ads.mu.Unlock()
	tg.ads.wake <- struct{}{}
	waitFor(t, "b re-advertised", func() bool { return f.count(b) == 2 })
	if still || f.count(a) != 1 {
		t.Fatalf("a still held=%v, provided %d times after removal", still, f.count(a))
	}

	// A failed provide is retried with backoff, not dropped.
	f.mu.Lock()
	f.fail = true
	f.mu.Unlock()
	c := TagRef{"docker.io", "library/busybox", "1"}
	tg.Set([]TagRef{b, c})
	waitFor(t, "failure recorded", func() bool {
		tg.ads.mu.Lock()
		defer tg.ads.mu.Unlock()
		return tg.ads.keys[c] != nil && tg.ads.keys[c].fails > 0
	})
	tg.ads.mu.Lock()
	due := tg.ads.keys[c].due
	tg.ads.mu.Unlock()
	if !due.After(time.Now()) {
		t.Fatal("failed provide not scheduled for a retry")
	}
}

func TestTagsResolve(t *testing.T) {
	r := TagRef{"docker.io", "library/alpine", "3.20"}
	old := TagTarget{Digest: digestOf("old"), Size: 500, Updated: time.Unix(1000, 0)}
	newer := TagTarget{Digest: digestOf("new"), Size: 600, Updated: time.Unix(2000, 0)}

	t.Run("unlisted registry is refused without a lookup", func(t *testing.T) {
		tg, f := newFakeTags(t, "docker.io")
		f.provs = []peer.AddrInfo{{ID: "p1"}}
		f.answers["p1"] = newer
		_, err := tg.Resolve(context.Background(), TagRef{"quay.io", "library/alpine", "3.20"})
		if !errors.Is(err, blob.ErrNotFound) || f.finds != 0 {
			t.Fatalf("err %v, finds %d: want ErrNotFound and no lookup", err, f.finds)
		}
	})
	t.Run("nobody holds it", func(t *testing.T) {
		tg, _ := newFakeTags(t, "docker.io")
		if _, err := tg.Resolve(context.Background(), r); !errors.Is(err, blob.ErrNotFound) {
			t.Fatalf("err %v, want ErrNotFound", err)
		}
	})
	t.Run("newest answer wins", func(t *testing.T) {
		tg, f := newFakeTags(t, "docker.io")
		f.provs = []peer.AddrInfo{{ID: "p1"}, {ID: "p2"}, {ID: "p3"}}
		f.answers["p1"] = old
		f.answers["p2"] = newer
		f.errs["p3"] = errors.New("connection refused")
		got, err := tg.Resolve(context.Background(), r)
		if err != nil || got.Digest != newer.Digest {
			t.Fatalf("got %v %v, want %s", got, err, newer.Digest)
		}
	})
	t.Run("bad answers are skipped", func(t *testing.T) {
		tg, f := newFakeTags(t, "docker.io")
		f.provs = []peer.AddrInfo{{ID: "p1"}, {ID: "p2"}, {ID: "p3"}, {ID: "p4"}}
		f.answers["p1"] = TagTarget{Digest: "sha256:nothex", Size: 5}
		f.answers["p2"] = TagTarget{Digest: digestOf("x"), Size: 5 << 20}
		f.errs["p3"] = fmt.Errorf("gone: %w", blob.ErrNotFound)
		f.answers["p4"] = old // in the second round
		got, err := tg.Resolve(context.Background(), r)
		if err != nil || got.Digest != old.Digest {
			t.Fatalf("got %v %v, want %s", got, err, old.Digest)
		}
	})
	t.Run("every provider dropped it", func(t *testing.T) {
		tg, f := newFakeTags(t, "docker.io")
		f.provs = []peer.AddrInfo{{ID: "p1"}, {ID: "p2"}}
		if _, err := tg.Resolve(context.Background(), r); !errors.Is(err, blob.ErrNotFound) {
			t.Fatalf("err %v, want ErrNotFound", err)
		}
	})
	t.Run("a failing peer is not a not-found", func(t *testing.T) {
		tg, f := newFakeTags(t, "docker.io")
		f.provs = []peer.AddrInfo{{ID: "p1"}}
		f.errs["p1"] = errors.New("tls: bad certificate")
		_, err := tg.Resolve(context.Background(), r)
		if err == nil || errors.Is(err, blob.ErrNotFound) {
			t.Fatalf("err %v, want a plain error", err)
		}
	})
}

// Two real nodes: A holds a tag in its "image store", B resolves it over
// the DHT and the authenticated data plane.
func TestTagsBetweenNodes(t *testing.T) {
	if testing.Short() {
		t.Skip("starts libp2p hosts")
	}
	held := TagRef{"127.0.0.1:5000", "team/app", "v1"}
	want := TagTarget{Digest: digestOf("manifest"), MediaType: "application/vnd.oci.image.manifest.v1+json", Size: 321, Updated: time.Unix(1700000000, 0).UTC()}
	var lmu sync.Mutex
	local := map[TagRef]TagTarget{held: want}

	a := startNode(t, nil)
	b := startNode(t, nil, a)
	c := startNode(t, nil, a) // tag resolution off
	waitFor(t, "b and c connected", func() bool { return b.RoutingTableSize() > 0 && c.RoutingTableSize() > 0 })

	ta, err := a.EnableTags(TagOptions{Registries: []string{"127.0.0.1:5000", "docker.io"}, Local: func(ctx context.Context, r TagRef) (TagTarget, error) {
		lmu.Lock()
		defer lmu.Unlock()
		if tt, ok := local[r]; ok {
			return tt, nil
		}
		return TagTarget{}, fmt.Errorf("image %s: %w", r, blob.ErrNotFound)
	}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.EnableTags(TagOptions{Registries: []string{"docker.io"}}); err == nil {
		t.Fatal("EnableTags twice succeeded")
	}
	tb, err := b.EnableTags(TagOptions{Registries: []string{"127.0.0.1:5000"}})
	if err != nil {
		t.Fatal(err)
	}
	ta.Set([]TagRef{held})
	waitFor(t, "a advertised its tag", func() bool { return counter(t, a.reg, "peerd_p2p_tag_provides_total", "ok") > 0 })

	got, err := tb.Resolve(context.Background(), held)
	if err != nil || got != want {
		t.Fatalf("b resolved %+v, %v; want %+v", got, err, want)
	}
	if counter(t, a.reg, "peerd_p2p_tag_requests_total", "ok") != 1 || counter(t, b.reg, "peerd_p2p_tag_resolves_total", "peer") != 1 {
		t.Fatal("metrics did not count the answer")
	}

	// A tag nobody advertises, and one of a registry b does not list.
	if _, err := tb.Resolve(context.Background(), TagRef{"127.0.0.1:5000", "team/app", "v2"}); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("unadvertised tag: %v", err)
	}
	if _, err := tb.Resolve(context.Background(), TagRef{"docker.io", "library/alpine", "1"}); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("unlisted registry: %v", err)
	}

	// Asked directly, a refuses a registry it does not list and answers
	// for what its store holds now, not what it advertised.
	if _, err := b.askTag(context.Background(), peer.AddrInfo{ID: a.ID()}, TagRef{"quay.io", "team/app", "v1"}); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("unlisted registry asked directly: %v", err)
	}
	if counter(t, a.reg, "peerd_p2p_tag_requests_total", "refused") != 1 {
		t.Fatal("refusal not counted")
	}
	lmu.Lock()
	delete(local, held)
	lmu.Unlock()
	if _, err := tb.Resolve(context.Background(), held); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("after a dropped the image: %v, want ErrNotFound", err)
	}
	ta.Set(nil)
	if len(ta.Held()) != 0 {
		t.Fatal("a still advertises the dropped tag")
	}

	// A node without tag resolution answers "not held".
	if _, err := b.askTag(context.Background(), peer.AddrInfo{ID: c.ID()}, held); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("node with tags off: %v", err)
	}
}
