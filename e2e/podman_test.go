package e2e

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/reliability"
)

// TestPodman runs the mirror for containers/image clients (CRI-O, Podman)
// on a cluster of its own: 5 nodes by default (E2E_NODES), the first
// nodes-2 of them Podman nodes, the last two containerd nodes. A Podman
// node's peerd runs without containerd (--containerd-socket=; its
// containerd is stopped), and its Podman reads the drop-in that
// `peerd registries-config` wrote (as CONTAINERS_REGISTRIES_CONF), with its
// own storage (E2E_PODMAN_DRIVER, default overlay; vfs where overlay is
// unavailable). Every pull is by tag, as a pod spec names an image.
// Scenarios, in this order:
//
//	p1-second     node 1 pulls, then node 2: the registry sends node 2's
//	              pull at most 10 % of the image; node 2's image has the
//	              pushed manifest digest and layers (podman image inspect,
//	              podman save)
//	p2-cold-burst every Podman node at once, nothing cached: the registry
//	              sends at most 1.2× the image
//	p3-mixed      a Podman node pulls, then both containerd nodes; a
//	              containerd node pulls, then the other Podman nodes: each
//	              time the followers cost the registry at most 10 %
func TestPodman(t *testing.T) {
	if os.Getenv("E2E_PODMAN") == "0" {
		t.Skip("E2E_PODMAN=0: the Podman cluster is turned off")
	}
	if enabled() {
		if _, err := exec.LookPath("podman"); err != nil {
			t.Fatal("podman is missing (apt-get install podman; tools/test-setup.sh installs it)")
		}
	}
	c := newClusterWith(t, func(cfg *config) {
		if os.Getenv("E2E_NODES") == "" {
			cfg.Nodes = 5
		}
		cfg.Containerd16, cfg.CRINode = 0, false
	})
	t.Cleanup(func() { printRows(os.Stdout) })
	c.need(t, "p2p", "containerd")
	if !c.hasFlag("pull-through") {
		t.Fatal("this peerd build lacks --pull-through: a missing feature is a failure, not a skip")
	}
	driver := os.Getenv("E2E_PODMAN_DRIVER")
	if driver == "" {
		driver = "overlay"
	}
	pods := c.nodes[:len(c.nodes)-2]
	for _, n := range pods {
		n.podman = filepath.Join(n.dir, "podman")
		n.podmanDriver = driver
		out, err := sh(context.Background(), c.bin.peerd, "registries-config",
			"--conf-dir", filepath.Join(n.podman, "registries.conf.d"),
			"--registries", "http://"+registryID, "--mirror", "http://"+peerdHTTP)
		if err != nil {
			t.Fatalf("%s: registries-config: %v\n%s", n.name(), err, out)
		}
		n.containerd.Stop(10 * time.Second)
	}
	c.reconfigure(t, func(n *node) []string {
		if n.podman != "" {
			return []string{"--containerd-socket="}
		}
		return nil
	})
	for _, n := range pods {
		if v, err := c.metric(n, "peerd_runtime_mode", `mode="none"`); err != nil || v != 1 {
			t.Fatalf("%s runs without containerd, but peerd_runtime_mode{mode=\"none\"} is %v (%v)", n.name(), v, err)
		}
		if out, err := c.podmanCmd(context.Background(), n, "info", "--format", "{{.Store.GraphDriverName}}"); err != nil || strings.TrimSpace(out) != driver {
			t.Fatalf("%s: podman's storage driver is %q, want %s (E2E_PODMAN_DRIVER=vfs where overlay is unavailable): %v", n.name(), strings.TrimSpace(out), driver, err)
		}
	}
	ctrd := c.nodes[len(c.nodes)-2:]
	c.run(t, "p1-second", func(t *testing.T) { c.podmanSecond(t, pods) })
	c.run(t, "p2-cold-burst", func(t *testing.T) { c.podmanBurst(t, pods) })
	c.run(t, "p3-mixed", func(t *testing.T) { c.podmanMixed(t, pods, ctrd) })
}

// podmanCmd runs podman inside the node's namespace with the node's own
// storage, registries.conf (the drop-in registries-config wrote) and HOME.
func (c *cluster) podmanCmd(ctx context.Context, n *node, args ...string) (string, error) {
	base := []string{"env",
		"CONTAINERS_REGISTRIES_CONF=" + filepath.Join(n.podman, "registries.conf.d", "zz-peerd.conf"),
		"HOME=" + filepath.Join(n.podman, "home"),
		"podman", "--root", filepath.Join(n.podman, "root"), "--runroot", filepath.Join(n.podman, "run"),
		"--tmpdir", filepath.Join(n.podman, "tmp"), "--storage-driver", n.podmanDriver,
		"--events-backend", "file", "--cgroup-manager", "cgroupfs"}
	return shTimeout(ctx, 30*time.Minute, nsExec(n.ns, append(base, args...)...)...)
}

// podmanPull pulls ref on a Podman node and times it.
func (c *cluster) podmanPull(ctx context.Context, n *node, ref string) (time.Duration, error) {
	start := time.Now()
	if out, err := c.podmanCmd(ctx, n, "pull", "--quiet", ref); err != nil {
		return time.Since(start), fmt.Errorf("%s: podman pull %s: %w\n%s", n.name(), ref, err, out)
	}
	return time.Since(start), nil
}

// pullAny pulls with the node's client: Podman or containerd.
func (c *cluster) pullAny(ctx context.Context, n *node, ref string) (time.Duration, error) {
	if n.podman != "" {
		return c.podmanPull(ctx, n, ref)
	}
	return c.pull(ctx, n, ref)
}

// checkPodmanImage asks the node's Podman for the image: its manifest digest
// must be the pushed one and its layers the pushed layers (podman image
// inspect), and `podman save` must write every layer back with its digest.
func (c *cluster) checkPodmanImage(t *testing.T, n *node, im image) {
	t.Helper()
	ctx := context.Background()
	out, err := c.podmanCmd(ctx, n, "image", "inspect", "--format", "{{.Digest}} {{range .RootFS.Layers}}{{.}},{{end}}", im.ref)
	if err != nil {
		t.Fatalf("%s: %v", n.name(), err)
	}
	want := im.digest + " " + strings.Join(im.layers, ",") + ","
	if got := strings.TrimSpace(out); got != want {
		t.Fatalf("%s: podman image inspect: %q, want %q", n.name(), got, want)
	}
	dir := filepath.Join(n.podman, "save")
	os.RemoveAll(dir)
	defer os.RemoveAll(dir)
	if _, err := c.podmanCmd(ctx, n, "save", "--format", "oci-dir", "-o", dir, im.ref); err != nil {
		t.Fatalf("%s: %v", n.name(), err)
	}
	layers, err := savedLayers(dir)
	if err != nil {
		t.Fatalf("%s: podman save: %v", n.name(), err)
	}
	if strings.Join(layers, ",") != strings.Join(im.layers, ",") {
		t.Fatalf("%s: podman save wrote layers that unpack to %v, want %v", n.name(), layers, im.layers)
	}
}

// savedLayers reads the image `podman save --format oci-dir` wrote to dir and
// returns the digest of each layer's uncompressed bytes (podman compresses
// layers on save), checking every blob against the digest it is stored under.
func savedLayers(dir string) ([]string, error) {
	read := func(d string) ([]byte, error) {
		b, err := os.ReadFile(filepath.Join(dir, "blobs", "sha256", strings.TrimPrefix(d, "sha256:")))
		if err == nil && digestOf(b) != d {
			err = fmt.Errorf("blob %s holds other bytes", d)
		}
		return b, err
	}
	var index, manifest struct {
		Manifests []struct{ Digest string }            `json:"manifests"`
		Layers    []struct{ MediaType, Digest string } `json:"layers"`
	}
	b, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err == nil {
		err = json.Unmarshal(b, &index)
	}
	if err != nil || len(index.Manifests) != 1 {
		return nil, fmt.Errorf("index.json: %v (%d manifests)", err, len(index.Manifests))
	}
	if b, err = read(index.Manifests[0].Digest); err == nil {
		err = json.Unmarshal(b, &manifest)
	}
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	var out []string
	for _, l := range manifest.Layers {
		b, err := read(l.Digest)
		if err != nil {
			return nil, err
		}
		var r io.Reader = bytes.NewReader(b)
		if strings.HasSuffix(l.MediaType, "+gzip") {
			if r, err = gzip.NewReader(r); err != nil {
				return nil, fmt.Errorf("layer %s: %w", l.Digest, err)
			}
		}
		h := sha256.New()
		if _, err := io.Copy(h, r); err != nil {
			return nil, fmt.Errorf("layer %s: %w", l.Digest, err)
		}
		out = append(out, "sha256:"+hex.EncodeToString(h.Sum(nil)))
	}
	return out, nil
}

func digestOf(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// removePodman drops every image from the Podman nodes' storage.
func (c *cluster) removePodman() {
	for _, n := range c.nodes {
		if n.podman != "" {
			c.podmanCmd(context.Background(), n, "rmi", "--all", "--force")
		}
	}
}

// Scenario p1: one Podman node pulls, then another: the second pull comes
// from the first node through the peer network.
func (c *cluster) podmanSecond(t *testing.T, pods []*node) {
	ctx := context.Background()
	im := c.pushImage(ctx, "p1", 401)
	defer c.removePodman()
	e0, s0, p0 := c.egress(), c.peerServed(), c.provides(t, pods[0])
	first, err := c.podmanPull(ctx, pods[0], im.ref)
	if err != nil {
		t.Fatal(err)
	}
	adv := c.waitAdvertised(t, pods[0], p0, len(im.layers)+2)
	e1 := c.egress()
	d, err := c.podmanPull(ctx, pods[1], im.ref)
	if err != nil {
		t.Fatal(err)
	}
	second := c.egress() - e1
	c.report(row{scenario: "p1-second", nodes: 2, size: im.size, first: first, p50: d, max: d,
		egress: c.egress() - e0, peerServed: c.peerServed() - s0,
		note: fmt.Sprintf("Podman by tag; registry sent the second pull %s (%.3f× the image); %s", human(second), float64(second)/float64(im.size), adv)})
	if second > im.size/10 {
		t.Errorf("the registry sent %s for node 2's pull of a %s image; want at most 10%%", human(second), human(im.size))
	}
	for _, n := range pods[:2] {
		c.checkPodmanImage(t, n, im)
	}
	reliability.Record(t, reliability.Row{Area: "runtime",
		Case:    "Podman nodes (peerd without containerd, drop-in of `peerd registries-config`): one pulls by tag, then another",
		Outcome: "both pulls through peerd's mirror path; manifest digest and layers match (podman image inspect, podman save)",
		Figure:  fmt.Sprintf("registry sent the second pull %s of a %s image", human(second), human(im.size))})
}

// Scenario p2: every Podman node pulls at once with nothing cached anywhere.
func (c *cluster) podmanBurst(t *testing.T, pods []*node) {
	ctx := context.Background()
	im := c.pushImage(ctx, "p2", 402)
	defer c.removePodman()
	e0, s0 := c.egress(), c.peerServed()
	ds, err := concurrently(pods, func(n *node) (time.Duration, error) { return c.podmanPull(ctx, n, im.ref) })
	if err != nil {
		t.Fatal(err)
	}
	p50, mx := stats(ds)
	egress := c.egress() - e0
	c.report(row{scenario: "p2-cold-burst", nodes: len(pods), size: im.size, p50: p50, max: mx,
		egress: egress, peerServed: c.peerServed() - s0, note: "Podman nodes at once, by tag"})
	if egress > im.size*12/10 {
		t.Errorf("registry sent %s for a %s image to %d Podman nodes at once; want at most 1.2×", human(egress), human(im.size), len(pods))
	}
	for _, n := range pods {
		c.checkPodmanImage(t, n, im)
	}
	reliability.Record(t, reliability.Row{Area: "runtime",
		Case:    fmt.Sprintf("%d Podman nodes pull one image by tag at once, nothing cached", len(pods)),
		Outcome: "every pull completes; images match",
		Figure:  fmt.Sprintf("registry egress %.2f× the image", float64(egress)/float64(im.size))})
}

// Scenario p3: sharing in both directions between the two kinds of node.
func (c *cluster) podmanMixed(t *testing.T, pods, ctrd []*node) {
	ctx := context.Background()
	defer c.removePodman()
	for i, dir := range []struct {
		name, image string
		seed        *node
		followers   []*node
	}{
		{"podman→containerd", "p3-pc", pods[0], ctrd},
		{"containerd→podman", "p3-cp", ctrd[0], pods[1:]},
	} {
		im := c.pushImage(ctx, dir.image, 403+uint64(i))
		e0, s0, p0 := c.egress(), c.peerServed(), c.provides(t, dir.seed)
		first, err := c.pullAny(ctx, dir.seed, im.ref)
		if err != nil {
			t.Fatal(err)
		}
		adv := c.waitAdvertised(t, dir.seed, p0, len(im.layers)+2)
		e1 := c.egress()
		ds, err := concurrently(dir.followers, func(n *node) (time.Duration, error) { return c.pullAny(ctx, n, im.ref) })
		if err != nil {
			t.Fatal(err)
		}
		followers := c.egress() - e1
		p50, mx := stats(ds)
		c.report(row{scenario: "p3-mixed", nodes: 1 + len(dir.followers), size: im.size, first: first, p50: p50, max: mx,
			egress: c.egress() - e0, peerServed: c.peerServed() - s0,
			note: fmt.Sprintf("%s: registry sent the followers %s (%.3f× the image); %s", dir.name, human(followers), float64(followers)/float64(im.size), adv)})
		if followers > im.size/10 {
			t.Errorf("%s: the registry sent %s for the followers' pulls of a %s image; want at most 10%%", dir.name, human(followers), human(im.size))
		}
		for _, n := range dir.followers {
			if n.podman != "" {
				c.checkPodmanImage(t, n, im)
			}
		}
		reliability.Record(t, reliability.Row{Area: "runtime",
			Case:    fmt.Sprintf("mixed cluster, %s: one node pulls, then %d of the other kind at once", dir.name, len(dir.followers)),
			Outcome: "the followers read from the first node through the peer network",
			Figure:  fmt.Sprintf("registry sent the followers %s of a %s image", human(followers), human(im.size))})
		c.removeEverywhere(im)
	}
}
