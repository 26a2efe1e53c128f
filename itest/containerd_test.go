package itest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/testenv"
	"github.com/peerd-project/peerd/internal/testproc"
)

// The containerd mirror against the real thing: containerd daemons (Debian's
// 1.6 and 2.x built by tools/containerd2.sh), Debian's docker-registry
// (CNCF distribution) behind a counting proxy, and peerd nodes that share
// blobs over the peer network. Needs root (containerd); CI runs as root.

const ctrdNS = "k8s.io"

type ctrdBuild struct {
	name, daemon, ctr string
	missing, how      string // why daemon is empty, and how to get it
}

func containerdBuilds(t *testing.T) []ctrdBuild {
	// Both builds are always listed: a missing one is a loud skip (a
	// failure under CI=true), never a subtest that silently disappears.
	var out []ctrdBuild
	d, derr := exec.LookPath("containerd")
	c, cerr := exec.LookPath("ctr")
	if derr == nil && cerr == nil {
		out = append(out, ctrdBuild{name: "containerd-1.x", daemon: d, ctr: c})
	} else {
		out = append(out, ctrdBuild{name: "containerd-1.x", missing: "containerd 1.x (containerd, ctr) not installed",
			how: "apt-get install containerd runc; tools/test-setup.sh does as root"})
	}
	cache := os.Getenv("TOOLS_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "peerd-tools")
	}
	dirs, _ := filepath.Glob(filepath.Join(cache, "containerd-v2*"))
	sort.Strings(dirs)
	if len(dirs) > 0 {
		d := dirs[len(dirs)-1]
		out = append(out, ctrdBuild{name: "containerd-2.x", daemon: filepath.Join(d, "containerd"), ctr: filepath.Join(d, "ctr")})
	} else {
		out = append(out, ctrdBuild{name: "containerd-2.x", missing: "containerd 2.x not built in " + cache,
			how: "bash tools/containerd2.sh; tools/test-setup.sh does"})
	}
	return out
}

func TestContainerdMirror(t *testing.T) {
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
			testContainerdMirror(t, b, reg)
		})
	}
}

func testContainerdMirror(t *testing.T, build ctrdBuild, registryBin string) {
	reg := startCtrdRegistry(t, registryBin)
	img := makeOCIImage(t, "team/app", "v1", 3<<20, 2<<20, 1<<20+12345)
	reg.push(t, img)
	layerBytes := img.blobBytes()

	// Three nodes, each a containerd with its own root, state and socket and
	// a peerd pointed at it. B and C find A through the DHT.
	nodes := make([]*ctrdNode, 3)
	for i := range nodes {
		var boot []string
		if i > 0 {
			boot = []string{"--bootstrap", nodes[0].peerd.P2PAddr}
		}
		nodes[i] = startCtrdNode(t, build, reg.Host, boot...)
	}
	a, b, c := nodes[0], nodes[1], nodes[2]
	for _, n := range nodes {
		ctrdWaitMetric(t, n.peerd.Node, "peerd_containerd_mirror_configured", 1)
	}

	// A: cold pull; the registry serves every blob.
	reg.reset()
	a.pull(t, reg.Host+"/team/app:v1")
	coldBytes := reg.blobBytes.Load()
	t.Logf("pull A (cold, registry only): registry blob bytes %d of %d", coldBytes, layerBytes)
	if coldBytes < layerBytes {
		t.Fatalf("cold pull: registry served %d blob bytes, the image has %d: the pull did not go to the registry", coldBytes, layerBytes)
	}
	a.wantContent(t, img.digests()...)
	// 2.x announces each committed blob; 1.x only the image.
	topic := "/images/create"
	if strings.HasSuffix(build.name, "2.x") {
		topic = "/content/create"
	}
	ctrdWaitFor(t, 30*time.Second, "A's peerd hears "+topic, func() bool {
		return a.peerd.Metric(t, "peerd_containerd_events_total", "topic="+topic) > 0
	})

	// A's peerd serves A's own containerd content and tags.
	ctrdWaitMetric(t, a.peerd.Node, "peerd_containerd_blobs", float64(len(img.digests())))
	code, hdr, body := Get(t, "GET", a.peerd.URL("/v2/team/app/blobs/"+img.layerDigests[1]+"?ns="+reg.Host), nil)
	if code != 200 || Digest(body) != img.layerDigests[1] || hdr.Get("Docker-Content-Digest") != img.layerDigests[1] {
		t.Fatalf("A's mirror, own layer: %d, digest %s", code, Digest(body))
	}
	code, hdr, _ = Get(t, "HEAD", a.peerd.URL("/v2/team/app/manifests/v1?ns="+reg.Host), nil)
	if code != 200 || hdr.Get("Docker-Content-Digest") != img.manifestDigest || hdr.Get("Content-Type") != "application/vnd.oci.image.manifest.v1+json" {
		t.Fatalf("A's mirror, tag from the local image store: %d %v", code, hdr)
	}
	if n := a.peerd.Metric(t, "peerd_oci_responses_total", `from=containerd`); n < 2 {
		t.Fatalf("peerd_oci_responses_total{from=containerd} = %v", n)
	}

	// Wait until B finds A as a provider (the config is the smallest blob).
	ctrdWaitFor(t, 60*time.Second, "B finds A's blobs on the peer network", func() bool {
		code, _, _ := Get(t, "HEAD", b.peerd.URL("/v2/team/app/blobs/"+img.configDigest+"?ns="+reg.Host), nil)
		return code == 200
	})

	// B: pulls through peerd B; the layers come from A.
	reg.reset()
	b.pull(t, reg.Host+"/team/app:v1")
	peerBytes := reg.blobBytes.Load()
	t.Logf("pull B (through peerd, A holds the image): registry blob bytes %d of %d (manifest bytes %d)", peerBytes, layerBytes, reg.manifestBytes.Load())
	if peerBytes > layerBytes/10 {
		t.Fatalf("pull through peers: the registry still served %d of %d blob bytes", peerBytes, layerBytes)
	}
	b.wantContent(t, img.digests()...)
	if n := b.peerd.Metric(t, "peerd_oci_responses_total", "kind=blob", "from=cache"); n < float64(len(img.layerDigests)) {
		t.Fatalf("B's mirror served %v blobs from the cache/peers, want at least %d", n, len(img.layerDigests))
	}

	// An unknown blob: 404 with an OCI body, so containerd falls back...
	_, missing := RandomBlob(t, 64)
	code, hdr, body = Get(t, "GET", b.peerd.URL("/v2/team/app/blobs/"+missing+"?ns="+reg.Host), nil)
	if code != 404 || !strings.Contains(string(body), `"BLOB_UNKNOWN"`) || hdr.Get("Content-Type") != "application/json" {
		t.Fatalf("unknown blob: %d %s %q", code, hdr.Get("Content-Type"), body)
	}
	// ...and it does: v2 shares a layer with v1 and adds one no peer holds.
	img2 := makeOCIImage(t, "team/app", "v2", 1<<20+777)
	img2.addLayer(img.layers[0], img.diffIDs[0])
	reg.push(t, img2)
	ctrdWaitFor(t, 60*time.Second, "B advertises what it pulled", func() bool {
		return b.peerd.Metric(t, "peerd_containerd_blobs") >= float64(len(img.digests()))
	})
	reg.reset()
	b.pull(t, reg.Host+"/team/app:v2")
	fallbackBytes := reg.blobBytes.Load()
	newBytes := int64(len(img2.config) + len(img2.layers[0]))
	t.Logf("pull B of v2 (one new layer only the registry has): registry blob bytes %d, new blob bytes %d", fallbackBytes, newBytes)
	if fallbackBytes < newBytes || fallbackBytes > newBytes+int64(len(img.layers[0]))/10 {
		t.Fatalf("fallback pull: registry served %d blob bytes, want the %d new ones (and not the shared layer)", fallbackBytes, newBytes)
	}
	b.wantContent(t, img2.digests()...)

	// A peer's request is answered from local content only.
	code, _, _ = Get(t, "GET", c.peerd.URL("/v2/team/app/blobs/"+img.layerDigests[0]+"?ns="+reg.Host), map[string]string{"X-Peerd-Local-Only": "1"})
	if code != 404 {
		t.Fatalf("local-only request to C, which holds nothing: %d", code)
	}

	// The registry goes away; C still pulls v1 by digest from its peers.
	reg.stop()
	c.pull(t, reg.Host+"/team/app@"+img.manifestDigest)
	t.Logf("pull C by digest with the registry stopped: registry blob bytes 0 (registry down), pull succeeded")
	c.wantContent(t, img.digests()...)

	// containerd restarts under A's peerd: it reconnects and resyncs.
	reconnects := a.peerd.Metric(t, "peerd_containerd_reconnects_total")
	a.stopDaemon()
	ctrdWaitFor(t, 30*time.Second, "A's peerd notices containerd is gone", func() bool {
		return a.peerd.Metric(t, "peerd_containerd_connected") == 0
	})
	a.startDaemon(t)
	ctrdWaitFor(t, 60*time.Second, "A's peerd follows the restarted containerd", func() bool {
		return a.peerd.Metric(t, "peerd_containerd_connected") == 1
	})
	if a.peerd.Metric(t, "peerd_runtime_mode", "mode=containerd") != 1 || a.peerd.Metric(t, "peerd_runtime_mode", "mode=none") != 0 {
		t.Fatal("a node following containerd: peerd_runtime_mode does not say containerd")
	}
	if a.peerd.Metric(t, "peerd_containerd_reconnects_total") <= reconnects {
		t.Fatal("peerd_containerd_reconnects_total did not grow over a containerd restart")
	}
	code, _, body = Get(t, "GET", a.peerd.URL("/v2/team/app/blobs/"+img.layerDigests[0]+"?ns="+reg.Host), nil)
	if code != 200 || Digest(body) != img.layerDigests[0] {
		t.Fatalf("A's mirror after the containerd restart: %d", code)
	}

	// containerd deletes the image: A's peerd withdraws its blobs.
	if out, err := a.ctr(t, time.Minute, "images", "rm", "--sync", reg.Host+"/team/app:v1"); err != nil {
		t.Fatalf("ctr images rm: %v\n%s", err, out)
	}
	ctrdWaitFor(t, 30*time.Second, "A's peerd withdraws the deleted blobs", func() bool {
		return a.peerd.Metric(t, "peerd_containerd_blobs") == 0
	})
	if n := a.peerd.Metric(t, "peerd_containerd_withdrawn_total"); n < float64(len(img.digests())) {
		t.Fatalf("peerd_containerd_withdrawn_total = %v, want >= %d", n, len(img.digests()))
	}
}

// ---------- containerd ----------

type ctrdNode struct {
	dir, sock, hostsDir, config string
	build                       ctrdBuild
	daemon                      *testproc.Proc
	peerd                       *p2pNode
}

func startCtrdNode(t *testing.T, build ctrdBuild, registryHost string, extra ...string) *ctrdNode {
	t.Helper()
	// Short paths: unix socket names are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "ctrd")
	if err != nil {
		t.Fatal(err)
	}
	n := &ctrdNode{dir: dir, sock: filepath.Join(dir, "c.sock"), hostsDir: filepath.Join(dir, "certs.d"), config: filepath.Join(dir, "config.toml"), build: build}
	// The pulls unpack with --snapshotter native.
	cfg, err := testproc.Containerd{Dir: dir, Socket: n.sock, HostsDir: n.hostsDir, V2: strings.HasSuffix(build.name, "2.x"), Snapshotter: "native"}.Render()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.config, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	n.startDaemon(t)
	t.Cleanup(func() {
		n.stopDaemon()
		if t.Failed() {
			t.Logf("--- containerd log (%s) ---\n%s", dir, testproc.Tail(filepath.Join(dir, "containerd.log"), 40))
		}
		os.RemoveAll(dir)
	})

	// Patient lookups: B's pull asserts the registry served (almost)
	// nothing while A holds the image, whatever the machine's load.
	n.peerd = startP2PNode(t, append(patient(
		"--containerd-socket", n.sock,
		"--containerd-namespace", ctrdNS,
		"--containerd-hosts-dir", n.hostsDir,
		"--containerd-config", n.config,
		"--containerd-resync", "2s",
		"--registries", registryHost,
	), extra...)...)
	// The real subcommand writes the hosts.toml containerd reads.
	out, err := exec.Command(peerdBin, "containerd-config", "--hosts-dir", n.hostsDir,
		"--registries", "http://"+registryHost, "--mirror", "http://"+n.peerd.HTTPAddr).CombinedOutput()
	if err != nil {
		t.Fatalf("peerd containerd-config: %v\n%s", err, out)
	}
	return n
}

func (n *ctrdNode) startDaemon(t *testing.T) {
	t.Helper()
	p, err := testproc.Start(testproc.Spec{Name: "containerd", Args: []string{n.build.daemon, "--config", n.config}, Log: filepath.Join(n.dir, "containerd.log")})
	if err != nil {
		t.Fatal(err)
	}
	n.daemon = p
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = testproc.Poll(ctx, 200*time.Millisecond, p.Done(), func(context.Context) error {
		out, err := n.ctr(t, 10*time.Second, "version")
		if err != nil {
			return fmt.Errorf("ctr version: %v: %s", err, strings.TrimSpace(out))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("containerd does not answer on %s: %v", n.sock, err)
	}
}

func (n *ctrdNode) stopDaemon() { n.daemon.Stop(15 * time.Second) }

func (n *ctrdNode) ctr(t *testing.T, timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, n.build.ctr, append([]string{"--address", n.sock, "--namespace", ctrdNS}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (n *ctrdNode) pull(t *testing.T, ref string) {
	t.Helper()
	out, err := n.ctr(t, 3*time.Minute, "images", "pull", "--hosts-dir", n.hostsDir, "--snapshotter", "native", ref)
	if err != nil {
		n.peerd.DumpLog(40)
		t.Fatalf("ctr pull %s on %s: %v\n%s", ref, n.dir, err, testproc.LastLines(out, 30))
	}
}

// wantContent checks containerd's content store holds every digest.
func (n *ctrdNode) wantContent(t *testing.T, digests ...string) {
	t.Helper()
	out, err := n.ctr(t, 30*time.Second, "content", "ls", "-q")
	if err != nil {
		t.Fatalf("ctr content ls: %v\n%s", err, out)
	}
	for _, d := range digests {
		if !strings.Contains(out, d) {
			t.Fatalf("containerd at %s lacks %s after the pull", n.dir, d)
		}
	}
}

// ---------- registry ----------

type ctrdRegistry struct {
	Host          string // the counting proxy containerd talks to
	direct        string // the registry itself, for pushes
	proc          *testproc.Proc
	proxy         *http.Server
	blobBytes     atomic.Int64
	manifestBytes atomic.Int64
}

func startCtrdRegistry(t *testing.T, bin string) *ctrdRegistry {
	t.Helper()
	dir := t.TempDir()
	port := FreePort(t, "127.0.0.1")
	r := &ctrdRegistry{direct: fmt.Sprintf("127.0.0.1:%d", port)}
	cfg := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n", filepath.Join(dir, "data"), r.direct)
	if err := os.WriteFile(filepath.Join(dir, "config.yml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := testproc.Start(testproc.Spec{Name: "registry", Args: []string{bin, "serve", filepath.Join(dir, "config.yml")},
		Log: filepath.Join(dir, "registry.log"), TermLeader: true})
	if err != nil {
		t.Fatal(err)
	}
	r.proc = p
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := testproc.Poll(ctx, 200*time.Millisecond, p.Done(), testproc.HTTPOK(nil, "http://"+r.direct+"/v2/")); err != nil {
		r.stop()
		t.Fatalf("registry does not answer: %v\n%s", err, p.Tail(20))
	}
	t.Cleanup(r.stop)

	// Every byte containerd gets from the registry passes this proxy.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.Host = ln.Addr().String()
	target, _ := url.Parse("http://" + r.direct)
	rp := httputil.NewSingleHostReverseProxy(target)
	r.proxy = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		ctr := &r.manifestBytes
		if strings.Contains(req.URL.Path, "/blobs/") {
			ctr = &r.blobBytes
		}
		rp.ServeHTTP(countingWriter{ResponseWriter: w, n: ctr}, req)
	})}
	go r.proxy.Serve(ln)
	return r
}

func (r *ctrdRegistry) reset() {
	r.blobBytes.Store(0)
	r.manifestBytes.Store(0)
}

// stop closes the proxy and stops the registry.
func (r *ctrdRegistry) stop() {
	if r.proxy != nil {
		r.proxy.Close()
	}
	r.proc.Stop(10 * time.Second)
}

// push uploads the blobs and the manifest with the distribution API.
func (r *ctrdRegistry) push(t *testing.T, img *ociImage) {
	t.Helper()
	base := "http://" + r.direct
	blobs := append([][]byte{img.config}, img.layers...)
	for _, b := range blobs {
		resp, err := http.Post(base+"/v2/"+img.repo+"/blobs/uploads/", "", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("start upload: %s", resp.Status)
		}
		loc, err := url.Parse(resp.Header.Get("Location"))
		if err != nil {
			t.Fatal(err)
		}
		loc = (&url.URL{Scheme: "http", Host: r.direct}).ResolveReference(loc)
		q := loc.Query()
		q.Set("digest", Digest(b))
		loc.RawQuery = q.Encode()
		req, _ := http.NewRequest(http.MethodPut, loc.String(), bytes.NewReader(b))
		req.Header.Set("Content-Type", "application/octet-stream")
		resp, err = http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("upload blob %s: %s", Digest(b), resp.Status)
		}
	}
	req, _ := http.NewRequest(http.MethodPut, base+"/v2/"+img.repo+"/manifests/"+img.tag, bytes.NewReader(img.manifest))
	req.Header.Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("put manifest: %s %s", resp.Status, body)
	}
}

// ---------- images ----------

type ociImage struct {
	repo, tag      string
	layers         [][]byte
	diffIDs        []string
	layerDigests   []string
	config         []byte
	configDigest   string
	manifest       []byte
	manifestDigest string
}

// makeOCIImage builds an image of gzip'd tar layers, each holding one file of
// random bytes (so layers neither compress nor repeat between runs).
func makeOCIImage(t *testing.T, repo, tag string, sizes ...int) *ociImage {
	t.Helper()
	img := &ociImage{repo: repo, tag: tag}
	for i, size := range sizes {
		data := make([]byte, size)
		if _, err := rand.Read(data); err != nil {
			t.Fatal(err)
		}
		var tarBuf bytes.Buffer
		tw := tar.NewWriter(&tarBuf)
		tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("%s-%s-layer%d.bin", strings.ReplaceAll(repo, "/", "-"), tag, i), Mode: 0o644, Size: int64(size), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)})
		tw.Write(data)
		tw.Close()
		var gz bytes.Buffer
		zw, _ := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
		zw.Write(tarBuf.Bytes())
		zw.Close()
		img.addLayer(gz.Bytes(), Digest(tarBuf.Bytes()))
	}
	img.seal()
	return img
}

func (img *ociImage) addLayer(gz []byte, diffID string) {
	img.layers = append(img.layers, gz)
	img.diffIDs = append(img.diffIDs, diffID)
	img.layerDigests = append(img.layerDigests, Digest(gz))
	img.seal()
}

// seal (re)builds the config and manifest from the layers.
func (img *ociImage) seal() {
	cfg := map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       map[string]any{},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": img.diffIDs},
	}
	img.config, _ = json.Marshal(cfg)
	img.configDigest = Digest(img.config)
	type desc struct {
		MediaType string `json:"mediaType"`
		Digest    string `json:"digest"`
		Size      int    `json:"size"`
	}
	m := struct {
		SchemaVersion int    `json:"schemaVersion"`
		MediaType     string `json:"mediaType"`
		Config        desc   `json:"config"`
		Layers        []desc `json:"layers"`
	}{2, "application/vnd.oci.image.manifest.v1+json",
		desc{"application/vnd.oci.image.config.v1+json", img.configDigest, len(img.config)}, nil}
	for i, l := range img.layers {
		m.Layers = append(m.Layers, desc{"application/vnd.oci.image.layer.v1.tar+gzip", img.layerDigests[i], len(l)})
	}
	img.manifest, _ = json.Marshal(m)
	img.manifestDigest = Digest(img.manifest)
}

func (img *ociImage) digests() []string {
	return append([]string{img.manifestDigest, img.configDigest}, img.layerDigests...)
}

// blobBytes is the size of the config and layers.
func (img *ociImage) blobBytes() int64 {
	n := int64(len(img.config))
	for _, l := range img.layers {
		n += int64(len(l))
	}
	return n
}

// ---------- helpers ----------

// ctrdWaitFor polls cond; the deadline only bounds a hang.
func ctrdWaitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for: %s", d, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func ctrdWaitMetric(t *testing.T, n *Node, name string, atLeast float64) {
	t.Helper()
	ctrdWaitFor(t, 60*time.Second, fmt.Sprintf("%s on %s >= %v", name, n.Name, atLeast), func() bool {
		return n.Metric(t, name) >= atLeast
	})
}
