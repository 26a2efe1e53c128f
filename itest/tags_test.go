package itest

import (
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/testenv"
	"github.com/peerd-project/peerd/internal/testproc"
)

// --resolve-tags against the real thing: containerd daemons, Debian's
// docker-registry and peerd nodes. A gate in front of the registry counts
// every request containerd makes and can refuse manifests by tag, so a pull
// that succeeds while it refuses got its tag from somewhere else.

func TestContainerdTagsFromPeers(t *testing.T) {
	if testing.Short() {
		t.Skip("starts containerd daemons and a registry")
	}
	testenv.NeedRoot(t, "containerd")
	reg := testenv.LookPath(t, "docker-registry", "docker-registry")
	for _, b := range containerdBuilds(t) {
		b := b
		t.Run(b.name, func(t *testing.T) {
			if b.daemon == "" {
				testenv.Missing(t, b.missing, b.how)
			}
			testContainerdTags(t, b, reg)
		})
	}
}

func testContainerdTags(t *testing.T, build ctrdBuild, registryBin string) {
	reg := startCtrdRegistry(t, registryBin)
	img := makeOCIImage(t, "team/tagged", "v1", 2<<20, 1<<20+321)
	reg.push(t, img)
	gate := startTagGate(t, reg.Host)
	ref := gate.Host + "/team/tagged:v1"
	tagPath := "/v2/team/tagged/manifests/v1?ns=" + gate.Host

	// A and B resolve tags through peers; C does not (the default).
	a := startCtrdNode(t, build, gate.Host, "--resolve-tags")
	b := startCtrdNode(t, build, gate.Host, "--resolve-tags", "--bootstrap", a.peerd.P2PAddr)
	c := startCtrdNode(t, build, gate.Host, "--bootstrap", a.peerd.P2PAddr)
	for _, n := range []*ctrdNode{a, b, c} {
		ctrdWaitMetric(t, n.peerd.Node, "peerd_containerd_mirror_configured", 1)
		ctrdWaitMetric(t, n.peerd.Node, "peerd_p2p_routing_table_peers", 1)
	}

	// A: cold pull. Nobody holds the tag yet, so A's mirror says 404 and
	// containerd asks the registry.
	gate.reset()
	a.pull(t, ref)
	coldTags, coldAll := gate.tagRequests.Load(), gate.requests.Load()
	t.Logf("pull A (cold): registry requests %d, of which manifest-by-tag %d", coldAll, coldTags)
	if coldTags < 1 {
		t.Fatalf("cold pull made %d manifest-by-tag requests to the registry, want >= 1", coldTags)
	}
	if n := a.peerd.Metric(t, "peerd_p2p_tag_resolves_total", "result=not_found"); n < 1 {
		t.Fatalf("A's mirror did not ask peers for the tag before the registry (resolves not_found = %v)", n)
	}
	ctrdWaitFor(t, 60*time.Second, "A advertises its tag", func() bool {
		return a.peerd.Metric(t, "peerd_p2p_advertised_tags") == 1 &&
			a.peerd.Metric(t, "peerd_p2p_tag_provides_total", "result=ok") >= 1
	})
	ctrdWaitFor(t, 60*time.Second, "B finds A's blobs on the peer network", func() bool {
		code, _, _ := Get(t, "HEAD", b.peerd.URL("/v2/team/tagged/blobs/"+img.configDigest+"?ns="+gate.Host), nil)
		return code == 200
	})

	// The registry now refuses every manifest by tag.
	gate.blockTags.Store(true)

	// Flag off: C's mirror resolves tags from its own image store only.
	code, _, body := Get(t, "HEAD", c.peerd.URL(tagPath), nil)
	if code != 404 {
		t.Fatalf("C (no --resolve-tags), tag it does not hold: %d %s, want 404", code, body)
	}
	if n := c.peerd.Metric(t, "peerd_p2p_tag_resolves_total"); n != 0 {
		t.Fatalf("C asked peers for a tag without --resolve-tags (%v)", n)
	}
	// ...so containerd falls back to the registry, which refuses.
	gate.reset()
	if out, err := c.ctr(t, 2*time.Minute, "images", "pull", "--hosts-dir", c.hostsDir, "--snapshotter", "native", ref); err == nil {
		t.Fatalf("C pulled %s with the registry's tag endpoint down and no peer tag lookup:\n%s", ref, testproc.LastLines(out, 10))
	}
	offTags := gate.tagRequests.Load()
	t.Logf("pull C (no --resolve-tags, registry refuses tags): failed as expected after %d manifest-by-tag requests to the registry", offTags)
	if offTags < 1 {
		t.Fatal("C's containerd did not fall back to the registry for the tag")
	}

	// Flag on: B resolves the tag through A and pulls without the registry.
	gate.reset()
	reg.reset()
	b.pull(t, ref)
	onTags, onAll := gate.tagRequests.Load(), gate.requests.Load()
	t.Logf("pull B (--resolve-tags, registry refuses tags): registry requests %d, of which manifest-by-tag %d; registry blob bytes %d of %d",
		onAll, onTags, reg.blobBytes.Load(), img.blobBytes())
	if onTags != 0 {
		t.Fatalf("B's containerd asked the registry for the tag %d times: the mirror did not resolve it", onTags)
	}
	b.wantContent(t, img.digests()...)
	if n := b.peerd.Metric(t, "peerd_p2p_tag_resolves_total", "result=peer"); n < 1 {
		t.Fatalf("B: peerd_p2p_tag_resolves_total{result=peer} = %v", n)
	}
	if n := a.peerd.Metric(t, "peerd_p2p_tag_requests_total", "result=ok"); n < 1 {
		t.Fatalf("A: peerd_p2p_tag_requests_total{result=ok} = %v", n)
	}
	out, err := b.ctr(t, 30*time.Second, "images", "ls", "-q")
	if err != nil || !strings.Contains(out, ref) {
		t.Fatalf("B's image store lacks %s: %v\n%s", ref, err, out)
	}
	code, hdr, _ := Get(t, "HEAD", b.peerd.URL(tagPath), nil)
	if code != 200 || hdr.Get("Docker-Content-Digest") != img.manifestDigest {
		t.Fatalf("B's mirror, tag now held locally: %d %s", code, hdr.Get("Docker-Content-Digest"))
	}

	// A registry --registries does not list is never resolved, with or
	// without the flag.
	for _, n := range []*ctrdNode{a, b} {
		code, _, _ := Get(t, "GET", n.peerd.URL("/v2/team/tagged/manifests/v1?ns=other.example:5000"), nil)
		if code != 404 {
			t.Fatalf("%s: tag of an unlisted registry: %d, want 404", n.peerd.Name, code)
		}
	}

	// Flag off, registry back: C pulls the tag from the registry and the
	// rest from peers.
	gate.blockTags.Store(false)
	gate.reset()
	c.pull(t, ref)
	t.Logf("pull C (no --resolve-tags, registry up): registry requests %d, of which manifest-by-tag %d", gate.requests.Load(), gate.tagRequests.Load())
	if gate.tagRequests.Load() < 1 {
		t.Fatal("C resolved the tag without the registry although --resolve-tags is off")
	}

	// A deletes the image: it stops advertising the tag and answers peers
	// "not held" for it.
	if out, err := a.ctr(t, time.Minute, "images", "rm", "--sync", ref); err != nil {
		t.Fatalf("ctr images rm: %v\n%s", err, out)
	}
	ctrdWaitFor(t, 30*time.Second, "A drops the deleted tag", func() bool {
		return a.peerd.Metric(t, "peerd_p2p_advertised_tags") == 0
	})
	ctrdWaitFor(t, 60*time.Second, "B advertises the tag it pulled", func() bool {
		return b.peerd.Metric(t, "peerd_p2p_tag_provides_total", "result=ok") >= 1
	})
	// B still holds it: A, now without the image, resolves it through B
	// (once A's provider cache forgets that nobody held the manifest when
	// A itself first pulled it).
	ctrdWaitFor(t, 30*time.Second, "A resolves the tag it deleted through B", func() bool {
		code, hdr, _ := Get(t, "HEAD", a.peerd.URL(tagPath), nil)
		return code == 200 && hdr.Get("Docker-Content-Digest") == img.manifestDigest
	})
	if n := a.peerd.Metric(t, "peerd_p2p_tag_resolves_total", "result=peer"); n < 1 {
		t.Fatalf("A: peerd_p2p_tag_resolves_total{result=peer} = %v", n)
	}
}

// tagGate sits between containerd and the registry's counting proxy.
type tagGate struct {
	Host        string
	requests    atomic.Int64 // every request
	tagRequests atomic.Int64 // GET/HEAD manifests by tag
	blockTags   atomic.Bool
}

func startTagGate(t *testing.T, upstream string) *tagGate {
	t.Helper()
	g := &tagGate{}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g.Host = ln.Addr().String()
	target, _ := url.Parse("http://" + upstream)
	rp := httputil.NewSingleHostReverseProxy(target)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.requests.Add(1)
		_, ref, ok := strings.Cut(r.URL.Path, "/manifests/")
		if ok && !strings.Contains(ref, ":") {
			g.tagRequests.Add(1)
			if g.blockTags.Load() {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusNotFound)
				if r.Method == http.MethodGet {
					w.Write([]byte(`{"errors":[{"code":"MANIFEST_UNKNOWN","message":"tag lookups refused by the test"}]}`))
				}
				return
			}
		}
		rp.ServeHTTP(w, r)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return g
}

func (g *tagGate) reset() {
	g.requests.Store(0)
	g.tagRequests.Store(0)
}
