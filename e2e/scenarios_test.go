package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestE2E brings one cluster up and runs the scenarios on it in turn; each
// uses its own image or file, so one's cache never helps another.
func TestE2E(t *testing.T) {
	c := newCluster(t)
	t.Cleanup(func() { printRows(os.Stdout) })
	// Streaming first: it needs only /blobs/ and the peer network. Node
	// loss last: the peers that saw node 1 die avoid it for a while after
	// it restarts (p2p's failure penalty, up to 2 minutes), which would
	// turn any later scenario seeded by node 1 into a test of that penalty.
	c.run(t, "3-streaming", c.streaming)
	c.run(t, "1-staggered", c.staggered)
	c.run(t, "2-cold-burst", c.coldBurst)
	c.run(t, "4-fuse", c.fuse)
	c.run(t, "6-registry-down", c.registryDown)
	c.run(t, "7-model-burst", c.modelBurst)
	c.run(t, "8-model-warm", c.modelWarm)
	c.run(t, "5-node-loss", c.nodeLoss)
}

func (c *cluster) need(t *testing.T, parts ...string) {
	t.Helper()
	if m := c.feats.missing(parts...); m != "" {
		t.Fatalf("this peerd build lacks %s: a missing feature is a failure, not a skip", m)
	}
}

// originFile puts size random bytes on the file origin under a registry
// storage path (with the "//" such redirect targets carry) and returns the
// URL a node asks its peerd for, and the local copy for comparison.
func (c *cluster) originFile(t *testing.T, size int64, seed uint64) (proxyURL, local, digest string) {
	t.Helper()
	tmp := filepath.Join(c.dir, "origin", fmt.Sprintf(".tmp-%d", seed))
	hexd, err := writeRandomFile(tmp, size, seed)
	if err != nil {
		t.Fatal(err)
	}
	rel := filepath.Join("storage", "docker", "registry", "v2", "blobs", "sha256", hexd[:2], hexd, "data")
	local = filepath.Join(c.dir, "origin", rel)
	if err := os.MkdirAll(filepath.Dir(local), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, local); err != nil {
		t.Fatal(err)
	}
	up := fmt.Sprintf("http://%s:%s/storage//docker/registry/v2/blobs/sha256/%s/%s/data", originIP, filePort, hexd[:2], hexd)
	return "http://" + peerdHTTP + "/blobs/" + up, local, "sha256:" + hexd
}

// concurrently runs f for every node at once and returns each one's time.
func concurrently(nodes []*node, f func(n *node) (time.Duration, error)) ([]time.Duration, error) {
	ds := make([]time.Duration, len(nodes))
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for k, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ds[k], errs[k] = f(n)
		}()
	}
	wg.Wait()
	var msgs []string
	for _, err := range errs {
		if err != nil {
			msgs = append(msgs, err.Error())
		}
	}
	if len(msgs) > 0 {
		return ds, fmt.Errorf("%d of %d failed:\n%s", len(msgs), len(nodes), strings.Join(msgs, "\n"))
	}
	return ds, nil
}

func (c *cluster) rangeRead(ctx context.Context, n *node, url, local string, seed uint64) (time.Duration, error) {
	start := time.Now()
	// Overlaybd-style: a bytes=0-0 size probe, then 512 KiB ranges in a
	// shuffled order, four in flight, each compared with the original.
	_, err := c.get(ctx, n, "-url", url, "-seg", "524288", "-order", "random", "-seed", fmt.Sprint(seed), "-parallel", "4", "-compare", local)
	return time.Since(start), err
}

// Scenario 3: node 1 streams a file from the throttled origin through
// /blobs/ with random range reads, then every other node does the same at
// once: they read it from the peers, so the origin sends it about once.
func (c *cluster) streaming(t *testing.T) {
	c.need(t, "p2p")
	ctx := context.Background()
	url, local, _ := c.originFile(t, c.cfg.ImageSize, 3)
	e0, s0, u0 := c.egress(), c.peerServed(), c.upstreamSnapshot()
	defer c.logUpstream(t, u0)
	v0 := c.verified(t, c.nodes[0])
	first, err := c.rangeRead(ctx, c.nodes[0], url, local, 1)
	if err != nil {
		t.Fatal(err)
	}
	done := c.waitVerified(t, c.nodes[0], v0)
	ds, err := concurrently(c.nodes[1:], func(n *node) (time.Duration, error) { return c.rangeRead(ctx, n, url, local, uint64(n.i)) })
	if err != nil {
		t.Fatal(err)
	}
	egress := c.egress() - e0
	p50, mx := stats(ds)
	c.report(row{scenario: "3-streaming", nodes: len(c.nodes), size: c.cfg.ImageSize, first: first, p50: p50, max: mx,
		egress: egress, peerServed: c.peerServed() - s0, note: "random 512KiB ranges via /blobs/; " + done})
	if limit := c.cfg.ImageSize * 11 / 10; egress > limit {
		t.Errorf("origin sent %s for a %s file read by %d nodes; want at most 1.1× the file (%s)", human(egress), human(c.cfg.ImageSize), len(c.nodes), human(limit))
	}
	os.Remove(local)
}

// Scenario 1: node 1 pulls an image, then all the others pull it at once;
// every pull succeeds and the registry sends the image about once.
func (c *cluster) staggered(t *testing.T) {
	c.need(t, "p2p", "containerd")
	ctx := context.Background()
	im := c.pushImage(ctx, "s1", 1)
	defer c.removeEverywhere(im)
	e0, s0, u0 := c.egress(), c.peerServed(), c.upstreamSnapshot()
	up0 := c.servedByNode()
	defer c.logUpstream(t, u0)
	first, err := c.pull(ctx, c.nodes[0], im.ref)
	if err != nil {
		t.Fatal(err)
	}
	ds, err := concurrently(c.nodes[1:], func(n *node) (time.Duration, error) { return c.pull(ctx, n, im.ref) })
	if err != nil {
		t.Fatal(err)
	}
	egress := c.egress() - e0
	p50, mx := stats(ds)
	// The rollout's load on the busiest uploader (issue 22 measures it).
	var most int64
	for i, v := range c.servedByNode() {
		most = max(most, v-up0[i])
	}
	c.report(row{scenario: "1-staggered", nodes: len(c.nodes), size: im.size, first: first, p50: p50, max: mx,
		egress: egress, peerServed: c.peerServed() - s0,
		note: fmt.Sprintf("%s; most one node uploaded: %s (%.1f× the image)", c.containerdNote(), human(most), float64(most)/float64(im.size))})
	if limit := im.size * 11 / 10; egress > limit {
		t.Errorf("registry sent %s for a %s image pulled by %d nodes; want at most 1.1× the image (%s)", human(egress), human(im.size), len(c.nodes), human(limit))
	}
	// What an operator sees on a follower right after its pull.
	c.checkDebugPage(t, c.nodes[len(c.nodes)-1], im)
}

func (c *cluster) containerdNote() string {
	if c.cfg.Containerd16 == 0 {
		return "ctr pull, containerd 2"
	}
	return fmt.Sprintf("ctr pull, containerd 2 (nodes 1-%d) and 1.6 (nodes %d-%d)", c.cfg.Nodes-c.cfg.Containerd16, c.cfg.Nodes-c.cfg.Containerd16+1, c.cfg.Nodes)
}

func (c *cluster) removeEverywhere(im image) {
	for _, n := range c.nodes {
		c.removeImage(n, im.ref)
		c.removeImage(n, im.byDigest())
	}
}

// Scenario 2: every node pulls at once with nothing cached anywhere. With
// pull-through (peerd fetches misses itself and the nodes split each blob's
// chunks between them) the registry must send the image about once: at most
// 1.2×. Without it only success is asserted (the figures are the baseline).
func (c *cluster) coldBurst(t *testing.T) {
	c.need(t, "p2p", "containerd")
	ctx := context.Background()
	im := c.pushImage(ctx, "s2", 2)
	defer c.removeEverywhere(im)
	e0, s0, u0 := c.egress(), c.peerServed(), c.upstreamSnapshot()
	defer c.logUpstream(t, u0)
	ds, err := concurrently(c.nodes, func(n *node) (time.Duration, error) { return c.pull(ctx, n, im.ref) })
	if err != nil {
		t.Fatal(err)
	}
	egress := c.egress() - e0
	p50, mx := stats(ds)
	swarm := c.hasFlag("pull-through")
	note := "all nodes at once (baseline)"
	if swarm {
		note = "all nodes at once (pull-through + swarm)"
	}
	c.report(row{scenario: "2-cold-burst", nodes: len(c.nodes), size: im.size, p50: p50, max: mx,
		egress: egress, peerServed: c.peerServed() - s0, note: note})
	if x := float64(egress) / float64(im.size); swarm && x > 1.2 {
		t.Fatalf("cold burst of %d nodes: the registry sent %.2f× the image, want ≤ 1.2×", len(c.nodes), x)
	}
}

// Scenario 4: node 1 pulls an image; node 2 reads its largest layer through
// its FUSE mount by digest alone. The bytes must match and the origin must
// send nothing: they come from node 1.
func (c *cluster) fuse(t *testing.T) {
	c.need(t, "p2p", "containerd", "fuse")
	ctx := context.Background()
	im := c.pushImage(ctx, "s4", 4)
	defer c.removeEverywhere(im)
	p0 := c.provides(t, c.nodes[0])
	first, err := c.pull(ctx, c.nodes[0], im.ref)
	if err != nil {
		t.Fatal(err)
	}
	adv := c.waitAdvertised(t, c.nodes[0], p0, len(im.layers)+2)
	layer, size := im.layers[0], im.layerLen[0]
	e0, s0 := c.egress(), c.peerServed()
	n2 := c.nodes[1]
	path := filepath.Join(n2.mount, "sha256", strings.TrimPrefix(layer, "sha256:"))
	start := time.Now()
	sum, got, err := hashPath(path)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("node2: read %s through FUSE: %v", path, err)
	}
	egress := c.egress() - e0
	c.report(row{scenario: "4-fuse", nodes: 2, size: size, first: first, p50: took, max: took,
		egress: egress, peerServed: c.peerServed() - s0, note: "node 2 reads node 1's layer via its mount; " + adv})
	if got != size || sum != layer {
		t.Errorf("node2 read %d bytes hashing to %s through FUSE; want %d bytes of %s", got, sum, size, layer)
	}
	// Nothing at all should reach the origin's link; allow a few stray
	// packets (ARP) but not one chunk.
	if egress > 64<<10 {
		t.Errorf("origin sent %s while node 2 read a layer node 1 holds; want none", human(egress))
	}
}

func hashPath(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", n, err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), n, nil
}

// Scenario 5: node 1 holds a file; the others read it (from node 1, whose
// link is throttled so the transfer takes a while) and node 1's peerd is
// killed with SIGKILL part-way. Every reader completes with the right bytes.
func (c *cluster) nodeLoss(t *testing.T) {
	c.need(t, "p2p")
	ctx := context.Background()
	url, local, digest := c.originFile(t, c.cfg.ImageSize, 5)
	defer os.Remove(local)
	n1 := c.nodes[0]
	first, err := c.get(ctx, n1, "-url", url, "-sha256", strings.TrimPrefix(digest, "sha256:"))
	if err != nil {
		t.Fatal(err)
	}
	// Slow node 1 down so the others are still reading when it dies.
	if _, err := sh(ctx, nsExec(n1.ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", c.cfg.Rate, "burst", "262144", "latency", "200ms")...); err != nil {
		t.Fatal(err)
	}
	defer func() {
		sh(ctx, nsExec(n1.ns, "tc", "qdisc", "del", "dev", "eth0", "root")...)
		if !n1.peerd.Running() {
			if err := c.startPeerd(n1); err != nil {
				t.Error(err)
				return
			}
			if err := c.waitReady(ctx, n1); err != nil {
				t.Error(err)
			}
		}
	}()
	e0, s0 := c.egress(), c.peerServed()
	base, err := c.metric(n1, "peerd_p2p_served_bytes_total", "")
	if err != nil {
		t.Fatal(err)
	}
	readers := c.nodes[1:]
	type res struct {
		ds  []time.Duration
		err error
	}
	doneCh := make(chan res, 1)
	go func() {
		ds, err := concurrently(readers, func(n *node) (time.Duration, error) {
			r, err := c.get(ctx, n, "-url", url, "-sha256", strings.TrimPrefix(digest, "sha256:"))
			return time.Duration(r.Seconds * float64(time.Second)), err
		})
		doneCh <- res{ds, err}
	}()
	// Kill once node 1 has served at least a few chunks.
	var served float64
	deadline := time.Now().Add(5 * time.Minute)
	var r res
	killed := false
	for !killed {
		select {
		case r = <-doneCh:
			t.Fatalf("the readers finished (err=%v) before node 1 served 4 MiB; nothing was killed mid-transfer", r.err)
		case <-time.After(100 * time.Millisecond):
		}
		served, _ = c.metric(n1, "peerd_p2p_served_bytes_total", "")
		if served-base >= 4<<20 {
			n1.peerd.Kill()
			killed = true
		} else if time.Now().After(deadline) {
			t.Fatalf("node 1 served only %s to peers in 5 minutes", human(int64(served-base)))
		}
	}
	r = <-doneCh
	if r.err != nil {
		t.Fatalf("after node 1 was killed: %v", r.err)
	}
	p50, mx := stats(r.ds)
	egress, peerServed := c.egress()-e0, int64(served)+c.peerServed()-s0
	// Bring node 1 back and report how soon it is part of the network
	// again (not asserted: how peers treat a node that died is p2p's policy).
	sh(ctx, nsExec(n1.ns, "tc", "qdisc", "del", "dev", "eth0", "root")...)
	restart := time.Now()
	if err := c.startPeerd(n1); err != nil {
		t.Fatal(err)
	}
	if err := c.waitReady(ctx, n1); err != nil {
		t.Fatal(err)
	}
	rejoin := "node 1 restarted but connected to no peer within 30s"
	for time.Since(restart) < 30*time.Second {
		if v, err := c.metric(n1, "peerd_p2p_connected_peers", ""); err == nil && int(v) >= len(c.nodes)-1 {
			rejoin = fmt.Sprintf("node 1 reconnected to all %d peers %v after restart", int(v), time.Since(restart).Round(10*time.Millisecond))
			break
		} else if err == nil && v > 0 {
			rejoin = fmt.Sprintf("node 1 reconnected to %d of %d peers within 30s of restart", int(v), len(c.nodes)-1)
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.report(row{scenario: "5-node-loss", nodes: len(c.nodes), size: c.cfg.ImageSize, first: time.Duration(first.Seconds * float64(time.Second)),
		p50: p50, max: mx, egress: egress, peerServed: peerServed,
		note: fmt.Sprintf("node 1 SIGKILLed after serving %s of it; %s", human(int64(served-base)), rejoin)})
}

// Scenario 6: node 1 pulls an image, the registry stops, and the other
// nodes still pull it by digest, through their peers.
func (c *cluster) registryDown(t *testing.T) {
	c.need(t, "p2p", "containerd")
	ctx := context.Background()
	im := c.pushImage(ctx, "s6", 6)
	defer c.removeEverywhere(im)
	p0 := c.provides(t, c.nodes[0])
	first, err := c.pull(ctx, c.nodes[0], im.ref)
	if err != nil {
		t.Fatal(err)
	}
	adv := c.waitAdvertised(t, c.nodes[0], p0, len(im.layers)+2)
	c.registry.Stop(10 * time.Second)
	defer func() {
		if err := c.startRegistry(ctx); err != nil {
			t.Error(err)
		}
	}()
	e0, s0 := c.egress(), c.peerServed()
	ds, err := concurrently(c.nodes[1:], func(n *node) (time.Duration, error) { return c.pull(ctx, n, im.byDigest()) })
	if err != nil {
		t.Fatal(err)
	}
	p50, mx := stats(ds)
	c.report(row{scenario: "6-registry-down", nodes: len(c.nodes), size: im.size, first: first, p50: p50, max: mx,
		egress: c.egress() - e0, peerServed: c.peerServed() - s0, note: "pull by digest with the registry stopped; " + adv})
}

// provides is how many DHT advertisements a node has completed.
func (c *cluster) provides(t *testing.T, n *node) float64 {
	t.Helper()
	v, err := c.metric(n, "peerd_p2p_provides_total", `result="ok"`)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// waitAdvertised waits (at most 30 s) until a node has completed want more
// DHT advertisements than it had at base: "after node 1 pulled" means after
// node 1 told the cluster, which takes a moment after ctr returns. It says
// how long that took, for the report.
func (c *cluster) waitAdvertised(t *testing.T, n *node, base float64, want int) string {
	t.Helper()
	start := time.Now()
	for {
		v := c.provides(t, n)
		if v-base >= float64(want) {
			return fmt.Sprintf("advertised %v after the pull", time.Since(start).Round(10*time.Millisecond))
		}
		if time.Since(start) > 30*time.Second {
			t.Logf("%s completed only %v of %d advertisements in 30s; going on", n.name(), v-base, want)
			return "advertisements incomplete"
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// verified is how many blobs a node's cache has verified against their digest.
func (c *cluster) verified(t *testing.T, n *node) float64 {
	t.Helper()
	v, err := c.metric(n, "peerd_cache_verifications_total", `result="ok"`)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// waitVerified waits (at most 30 s) until the node verified one more blob
// than base: "after node 1 read the file" means after its copy is complete
// and checked, which may trail the last range it served by a moment.
func (c *cluster) waitVerified(t *testing.T, n *node, base float64) string {
	t.Helper()
	start := time.Now()
	for c.verified(t, n) < base+1 {
		if time.Since(start) > 30*time.Second {
			t.Logf("%s did not verify the file within 30s of reading it; going on", n.name())
			return "node 1's copy not verified"
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Sprintf("node 1 verified it %v after its last read", time.Since(start).Round(10*time.Millisecond))
}
