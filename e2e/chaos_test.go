package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/reliability"
)

// TestChaos runs the chaos scenarios on a cluster of its own: each breaks
// something (lossy links, a partitioned node, a flapping registry, a slow
// peer, a full cache disk, a corrupted cache) while nodes pull or read, and
// asserts every pull or read completes with the right bytes or fails with an
// error where it must. The partition runs last: the peers that lost the
// partitioned node avoid it for a while afterwards (p2p's failure penalty).
func TestChaos(t *testing.T) {
	c := newCluster(t)
	t.Cleanup(func() { printRows(os.Stdout) })
	c.run(t, "c1-lossy-burst", c.lossyBurst)
	c.run(t, "c3-registry-flap", c.registryFlap)
	c.run(t, "c4-slow-peer", c.slowPeer)
	c.run(t, "c5-disk-full", c.diskFull)
	c.run(t, "c6-bit-flip", c.bitFlip)
	c.run(t, "c2-partition", c.partition)
}

// chaosTimeout bounds every pull or read of a chaos scenario: one still
// running after it counts as hung, not as slow.
const chaosTimeout = 4 * time.Minute

// pullAll pulls ref on every node at once, each bounded by chaosTimeout.
func (c *cluster) pullAll(ctx context.Context, nodes []*node, ref string) ([]time.Duration, error) {
	return concurrently(nodes, func(n *node) (time.Duration, error) { return c.pullBounded(ctx, n, ref) })
}

func (c *cluster) pullBounded(ctx context.Context, n *node, ref string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, chaosTimeout)
	defer cancel()
	d, err := c.pull(ctx, n, ref)
	if ctx.Err() != nil {
		return d, fmt.Errorf("%s: pull still running after %v (hung): %w", n.name(), chaosTimeout, err)
	}
	return d, err
}

// readAll reads a file through /blobs/ on every node at once, each checked
// against its digest and bounded by chaosTimeout.
func (c *cluster) readAll(ctx context.Context, nodes []*node, url, digest string) ([]time.Duration, error) {
	return concurrently(nodes, func(n *node) (time.Duration, error) {
		return c.readChecked(ctx, n, url, digest)
	})
}

func (c *cluster) readChecked(ctx context.Context, n *node, url, digest string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, chaosTimeout)
	defer cancel()
	start := time.Now()
	_, err := c.get(ctx, n, "-url", url, "-sha256", strings.TrimPrefix(digest, "sha256:"))
	if ctx.Err() != nil {
		return time.Since(start), fmt.Errorf("%s: read still running after %v (hung): %w", n.name(), chaosTimeout, err)
	}
	return time.Since(start), err
}

// nft loads an nftables ruleset into a node's namespace.
func nft(ctx context.Context, ns, rules string) error {
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %w: %s", ns, err, out)
	}
	return nil
}

// sumMetric sums a metric over the given nodes (running ones only).
func (c *cluster) sumMetric(nodes []*node, name, filter string) float64 {
	var s float64
	for _, n := range nodes {
		if n.peerd == nil || !n.peerd.Running() {
			continue
		}
		if v, err := c.metric(n, name, filter); err == nil {
			s += v
		}
	}
	return s
}

func ratio(a, b time.Duration) float64 { return a.Seconds() / b.Seconds() }

// Chaos 1: a cold burst while every packet between two nodes has a 5 %
// chance of being dropped (nftables on each node's output; the kernel here
// has no netem, so no added delay or jitter), next to a clean cold burst on
// the same cluster. Every pull must complete (containerd checks each blob's
// digest).
func (c *cluster) lossyBurst(t *testing.T) {
	c.need(t, "p2p", "containerd")
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("SKIP: nft not installed (apt-get install nftables): packet loss between nodes needs it")
	}
	ctx := context.Background()
	clean := c.pushImage(ctx, "c1clean", 101)
	e0 := c.egress()
	cds, err := c.pullAll(ctx, c.nodes, clean.ref)
	if err != nil {
		t.Fatalf("clean reference burst: %v", err)
	}
	cleanEgress := c.egress() - e0
	_, cleanMax := stats(cds)
	c.removeEverywhere(clean)

	im := c.pushImage(ctx, "c1", 102)
	defer c.removeEverywhere(im)
	rules := fmt.Sprintf(`table ip pe2e_chaos {
  chain out {
    type filter hook output priority 0; policy accept;
    ip daddr %s ip daddr != %s numgen random mod 100 < 5 counter drop
  }
}
`, subnet, originIP)
	for _, n := range c.nodes {
		if err := nft(ctx, n.ns, rules); err != nil {
			t.Fatal(err)
		}
	}
	defer func() {
		for _, n := range c.nodes {
			sh(ctx, nsExec(n.ns, "nft", "delete", "table", "ip", "pe2e_chaos")...)
		}
	}()
	e0, s0 := c.egress(), c.peerServed()
	ds, err := c.pullAll(ctx, c.nodes, im.ref)
	if err != nil {
		t.Fatal(err)
	}
	egress := c.egress() - e0
	var dropped int
	for _, n := range c.nodes {
		out, _ := sh(ctx, nsExec(n.ns, "nft", "list", "table", "ip", "pe2e_chaos")...)
		var pk, by int
		if i := strings.Index(out, "counter packets "); i >= 0 {
			fmt.Sscanf(out[i:], "counter packets %d bytes %d", &pk, &by)
		}
		dropped += pk
	}
	p50, mx := stats(ds)
	x, cx := float64(egress)/float64(im.size), float64(cleanEgress)/float64(clean.size)
	note := fmt.Sprintf("5%% loss between nodes (%d packets dropped); clean burst: egress %.2f×, max %v", dropped, cx, cleanMax.Round(10*time.Millisecond))
	c.report(row{scenario: "c1-lossy-burst", nodes: len(c.nodes), size: im.size, p50: p50, max: mx,
		egress: egress, peerServed: c.peerServed() - s0, note: note})
	reliability.Record(t, reliability.Row{Area: "chaos",
		Case:    fmt.Sprintf("cold burst of %d nodes with 5%% packet loss between nodes", len(c.nodes)),
		Outcome: "every pull completed with the right bytes",
		Figure: fmt.Sprintf("%d nodes pulled %s; registry sent %.2f× the image (clean burst %.2f×); slowest %.2f× the clean burst's slowest; %d packets dropped",
			len(c.nodes), human(im.size), x, cx, ratio(mx, cleanMax), dropped)})
}

// Chaos 2: all nodes pull at once; once one node (not a bootstrap node) has
// fetched a few MiB, it is cut off from the other nodes in both directions
// (blackhole routes to and from it) but keeps its link to the registry. Its
// pull must complete from the registry, the others' from the registry and
// each other.
func (c *cluster) partition(t *testing.T) {
	c.need(t, "p2p", "containerd")
	ctx := context.Background()
	im := c.pushImage(ctx, "c2", 103)
	defer c.removeEverywhere(im)
	x := c.nodes[2]
	others := append(append([]*node{}, c.nodes[:2]...), c.nodes[3:]...)
	e0, s0, u0 := c.egress(), c.peerServed(), c.upstreamSnapshot()
	f0, _ := c.metric(x, "peerd_fetched_bytes_total", "")
	type res struct {
		ds  []time.Duration
		err error
	}
	done := make(chan res, 1)
	start := time.Now()
	go func() {
		ds, err := c.pullAll(ctx, c.nodes, im.ref)
		done <- res{ds, err}
	}()
	type route struct{ ns, dst string }
	var routes []route
	defer func() {
		for _, r := range routes {
			sh(ctx, "ip", "-n", r.ns, "route", "del", "blackhole", r.dst)
		}
	}()
	var at time.Duration
	var fetched float64
	for at == 0 {
		select {
		case r := <-done:
			t.Fatalf("the pulls ended (err=%v) before %s fetched 4 MiB; nothing was partitioned mid-pull", r.err, x.name())
		case <-time.After(50 * time.Millisecond):
		}
		v, err := c.metric(x, "peerd_fetched_bytes_total", "")
		if err == nil && v-f0 >= 4<<20 {
			fetched, at = v-f0, time.Since(start)
		}
	}
	for _, o := range others {
		for _, r := range []route{{x.ns, o.ip + "/32"}, {o.ns, x.ip + "/32"}} {
			if _, err := sh(ctx, "ip", "-n", r.ns, "route", "add", "blackhole", r.dst); err != nil {
				t.Fatal(err)
			}
			routes = append(routes, r)
		}
	}
	r := <-done
	if r.err != nil {
		t.Fatalf("with %s partitioned %v into the burst: %v", x.name(), at.Round(10*time.Millisecond), r.err)
	}
	u1 := c.upstreamSnapshot()
	egress := c.egress() - e0
	p50, mx := stats(r.ds)
	xi := 2
	c.report(row{scenario: "c2-partition", nodes: len(c.nodes), size: im.size, p50: p50, max: mx,
		egress: egress, peerServed: c.peerServed() - s0,
		note: fmt.Sprintf("%s cut off from the nodes %v into the burst, after fetching %s; it took %v; its peerd fetched %s from the registry",
			x.name(), at.Round(10*time.Millisecond), human(int64(fetched)), r.ds[xi].Round(10*time.Millisecond), human(int64(u1[x.i]-u0[x.i])))})
	reliability.Record(t, reliability.Row{Area: "chaos",
		Case:    fmt.Sprintf("one of %d nodes cut off from the others mid-pull (keeps the registry)", len(c.nodes)),
		Outcome: "its pull fell back to the registry and completed; the others completed",
		Figure: fmt.Sprintf("all %d nodes pulled %s right; registry sent %.2f× the image; cut node %v, slowest other %v",
			len(c.nodes), human(im.size), float64(egress)/float64(im.size), r.ds[xi].Round(10*time.Millisecond), maxOf(r.ds, xi).Round(10*time.Millisecond))})
}

// maxOf is the longest duration but the one at skip.
func maxOf(ds []time.Duration, skip int) time.Duration {
	var m time.Duration
	for i, d := range ds {
		if i != skip && d > m {
			m = d
		}
	}
	return m
}

// Chaos 3: all nodes pull at once while the registry is stopped and
// started again every 1.5 s (five times). A pull may fail then, but only
// with an error and within the bound; once the registry stays up, every
// node pulls the image.
func (c *cluster) registryFlap(t *testing.T) {
	c.need(t, "p2p", "containerd")
	ctx := context.Background()
	im := c.pushImage(ctx, "c3", 104)
	defer c.removeEverywhere(im)
	e0 := c.egress()
	errs := make([]error, len(c.nodes))
	ds := make([]time.Duration, len(c.nodes))
	var wg sync.WaitGroup
	for k, n := range c.nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ds[k], errs[k] = c.pullBounded(ctx, n, im.ref)
		}()
	}
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	flaps := 0
	for flaps < 5 {
		select {
		case <-allDone:
		case <-time.After(1500 * time.Millisecond):
		}
		if isClosed(allDone) {
			break
		}
		c.registry.Stop(5 * time.Second)
		time.Sleep(1500 * time.Millisecond)
		if err := c.startRegistry(ctx); err != nil {
			t.Fatal(err)
		}
		flaps++
	}
	<-allDone
	var failed []*node
	var reasons []string
	for k, err := range errs {
		if err == nil {
			continue
		}
		if strings.Contains(err.Error(), "(hung)") {
			t.Errorf("%v", err)
		}
		failed = append(failed, c.nodes[k])
		reasons = append(reasons, firstErrorLine(err))
		t.Logf("pull during the flaps failed (allowed): %v", err)
	}
	if t.Failed() {
		return
	}
	// The registry is up for good now: every node that failed pulls again.
	rds, err := c.pullAll(ctx, failed, im.ref)
	if err != nil {
		t.Fatalf("after the registry stopped flapping: %v", err)
	}
	egress := c.egress() - e0
	var retryMax time.Duration
	total := append([]time.Duration(nil), ds...)
	for k, n := range failed {
		retryMax = max(retryMax, rds[k])
		total[n.i-1] += rds[k]
	}
	p50, mx := stats(total)
	note := fmt.Sprintf("registry restarted %d times during the burst; %d of %d pulls failed then", flaps, len(failed), len(c.nodes))
	if len(reasons) > 0 {
		note += " (" + reasons[0] + ")"
	}
	c.report(row{scenario: "c3-registry-flap", nodes: len(c.nodes), size: im.size, p50: p50, max: mx, egress: egress, note: note + "; p50/max: until each node held the image"})
	reliability.Record(t, reliability.Row{Area: "chaos",
		Case:    fmt.Sprintf("registry stopped and restarted %d times during a cold burst of %d nodes", flaps, len(c.nodes)),
		Outcome: "each pull completed or failed with an error, none hung; all completed once it stayed up",
		Figure: fmt.Sprintf("%d of %d pulls failed during the flaps, all %d pulled %s right afterwards (retries ≤ %v); registry sent %.2f× the image",
			len(failed), len(c.nodes), len(c.nodes), human(im.size), retryMax.Round(10*time.Millisecond), float64(egress)/float64(im.size))})
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// firstErrorLine is the most telling line of a pull error: ctr's own.
func firstErrorLine(err error) string {
	lines := strings.Split(err.Error(), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if l := strings.TrimSpace(lines[i]); strings.HasPrefix(l, "ctr:") {
			return l
		}
	}
	return strings.TrimSpace(lines[0])
}

// Chaos 4: nodes 1 and 2 hold a file; node 2's egress is then limited to
// 1 KiB/s (tc tbf) and the other nodes read the file at once. Each read
// must complete with the right bytes; the row says how long they took and
// how much of the file came from the slow node.
func (c *cluster) slowPeer(t *testing.T) {
	c.need(t, "p2p")
	ctx := context.Background()
	size := c.cfg.ImageSize / 4
	url, local, digest := c.originFile(t, size, 105)
	defer os.Remove(local)
	slow := c.nodes[1]
	for _, n := range c.nodes[:2] {
		v0 := c.verified(t, n)
		if _, err := c.readChecked(ctx, n, url, digest); err != nil {
			t.Fatal(err)
		}
		c.waitVerified(t, n, v0)
	}
	if _, err := sh(ctx, nsExec(slow.ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "8kbit", "burst", "2kb", "limit", "64kb")...); err != nil {
		t.Fatal(err)
	}
	defer sh(ctx, nsExec(slow.ns, "tc", "qdisc", "del", "dev", "eth0", "root")...)
	readers := c.nodes[2:]
	e0 := c.egress()
	sv0, _ := c.metric(slow, "peerd_p2p_served_bytes_total", "")
	w0 := txBytes(t, slow.ns)
	h0 := c.sumMetric(readers, "peerd_p2p_hedged_requests_total", "")
	r0 := c.sumMetric(readers, "peerd_p2p_resumed_transfers_total", "")
	ds, err := c.readAll(ctx, readers, url, digest)
	sv1, _ := c.metric(slow, "peerd_p2p_served_bytes_total", "")
	if err != nil {
		t.Fatalf("readers with %s answering at 1 KiB/s (it served %s meanwhile): %v", slow.name(), human(int64(sv1-sv0)), err)
	}
	wire := txBytes(t, slow.ns) - w0
	hedges := c.sumMetric(readers, "peerd_p2p_hedged_requests_total", "") - h0
	resumes := c.sumMetric(readers, "peerd_p2p_resumed_transfers_total", "") - r0
	p50, mx := stats(ds)
	egress := c.egress() - e0
	c.report(row{scenario: "c4-slow-peer", nodes: len(c.nodes), size: size, p50: p50, max: mx, egress: egress,
		peerServed: wire,
		note: fmt.Sprintf("%s at 1 KiB/s sent %s on its link (peer-served), after handing %s to its sockets; readers hedged %d, resumed %d requests",
			slow.name(), human(wire), human(int64(sv1-sv0)), int(hedges), int(resumes))})
	reliability.Record(t, reliability.Row{Area: "chaos",
		Case:    fmt.Sprintf("one of 2 holders answers at 1 KiB/s while %d nodes read a %s file", len(readers), human(size)),
		Outcome: "every read completed with the right bytes, hedged away from the slow peer",
		Figure: fmt.Sprintf("slowest read %v; the slow node sent %s on its link meanwhile; %d hedged, %d resumed requests",
			mx.Round(10*time.Millisecond), human(wire), int(hedges), int(resumes))})
}

// txBytes is what a namespace's eth0 has sent, headers included.
func txBytes(t *testing.T, ns string) int64 {
	t.Helper()
	out, err := sh(context.Background(), nsExec(ns, "cat", "/sys/class/net/eth0/statistics/tx_bytes")...)
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	if err != nil {
		t.Fatalf("tx_bytes of %s: %q: %v", ns, out, err)
	}
	return v
}

// restartPeerd stops a node's peerd, runs between (with peerd stopped), and
// starts it again, waiting until it is ready and connected to a peer.
func (c *cluster) restartPeerd(t *testing.T, n *node, between func() error) {
	t.Helper()
	ctx := context.Background()
	n.peerd.Stop(10 * time.Second)
	if between != nil {
		if err := between(); err != nil {
			t.Error(err)
		}
	}
	if err := c.startPeerd(n); err != nil {
		t.Fatal(err)
	}
	if err := c.waitReady(ctx, n); err != nil {
		t.Fatal(err)
	}
	for start := time.Now(); time.Since(start) < 30*time.Second; time.Sleep(200 * time.Millisecond) {
		if v, err := c.metric(n, "peerd_p2p_connected_peers", ""); err == nil && v > 0 {
			return
		}
	}
	t.Logf("%s: connected to no peer within 30s of its restart; going on", n.name())
}

// Chaos 5a: one node's peerd cache is on a file system smaller than the
// image (a tmpfs over <data-dir>/cache). Node 1 holds the image; the small
// node pulls it, then reads a file as large as the image through /blobs/.
// Both must complete with the right bytes.
func (c *cluster) diskFull(t *testing.T) {
	c.need(t, "p2p", "containerd")
	ctx := context.Background()
	x := c.nodes[2]
	cacheDir := filepath.Join(x.dir, "data", "cache")
	small := c.cfg.ImageSize / 3
	c.restartPeerd(t, x, func() error {
		if err := os.MkdirAll(cacheDir, 0o700); err != nil {
			return err
		}
		_, err := sh(ctx, "mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d,mode=0700", small), "pe2e-cache", cacheDir)
		return err
	})
	defer c.restartPeerd(t, x, func() error {
		_, err := sh(ctx, "umount", cacheDir)
		return err
	})
	im := c.pushImage(ctx, "c5", 106)
	defer c.removeEverywhere(im)
	p0 := c.provides(t, c.nodes[0])
	if _, err := c.pull(ctx, c.nodes[0], im.ref); err != nil {
		t.Fatal(err)
	}
	c.waitAdvertised(t, c.nodes[0], p0, len(im.layers)+2)
	url, local, digest := c.originFile(t, c.cfg.ImageSize, 107)
	defer os.Remove(local)
	e0 := c.egress()
	ds, perr := c.pullAll(ctx, []*node{x}, im.ref)
	rd, rerr := c.readChecked(ctx, x, url, digest)
	if err := errors.Join(perr, rerr); err != nil {
		t.Fatalf("%s with a %s cache file system: pull: %v; /blobs/ read: %v\n%s's log:\n%s", x.name(), human(small), errText(perr), errText(rerr), x.name(), grepLog(x.peerd.Logs(), "space", 10))
	}
	egress := c.egress() - e0
	c.report(row{scenario: "c5-disk-full", nodes: 2, size: im.size, p50: ds[0], max: rd, egress: egress,
		note: fmt.Sprintf("%s's cache on a %s tmpfs: pulled the image (p50), read a %s file (max)", x.name(), human(small), human(c.cfg.ImageSize))})
	reliability.Record(t, reliability.Row{Area: "chaos",
		Case:    fmt.Sprintf("a node's cache disk (%s) fills mid-pull", human(small)),
		Outcome: "the pull and a /blobs/ read larger than the disk completed with the right bytes",
		Figure:  fmt.Sprintf("pulled %s in %v, read %s in %v", human(im.size), ds[0].Round(10*time.Millisecond), human(c.cfg.ImageSize), rd.Round(10*time.Millisecond))})
}

func errText(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}

// grepLog is the last max lines of a log that contain substr.
func grepLog(log, substr string, max int) string {
	var hits []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(strings.ToLower(l), substr) {
			hits = append(hits, l)
		}
	}
	if len(hits) > max {
		hits = hits[len(hits)-max:]
	}
	return strings.Join(hits, "\n")
}

// Chaos 5b: a node holds a verified file; with its peerd stopped one byte
// of the cached copy is flipped on disk; after the restart that node and
// another (which can only get it from that node or the origin) read it.
// Every read must return the right bytes.
func (c *cluster) bitFlip(t *testing.T) {
	c.need(t, "p2p")
	ctx := context.Background()
	x, other := c.nodes[2], c.nodes[3]
	size := c.cfg.ImageSize / 4
	url, local, digest := c.originFile(t, size, 108)
	defer os.Remove(local)
	v0 := c.verified(t, x)
	if _, err := c.readChecked(ctx, x, url, digest); err != nil {
		t.Fatal(err)
	}
	c.waitVerified(t, x, v0)
	data := filepath.Join(x.dir, "data", "cache", "blobs", "sha256", strings.TrimPrefix(digest, "sha256:"), "data")
	off := size / 2
	c.restartPeerd(t, x, func() error {
		f, err := os.OpenFile(data, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		b := make([]byte, 1)
		if _, err := f.ReadAt(b, off); err != nil {
			return err
		}
		b[0] ^= 0x01
		_, err = f.WriteAt(b, off)
		return err
	})
	if t.Failed() {
		return
	}
	var errs []error
	var took []time.Duration
	for _, n := range []*node{x, other} {
		d, err := c.readChecked(ctx, n, url, digest)
		errs = append(errs, err)
		took = append(took, d)
	}
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("after flipping byte %d of %s's cached copy: %s's read: %s; %s's read: %s", off, x.name(), x.name(), errText(errs[0]), other.name(), errText(errs[1]))
	}
	c.report(row{scenario: "c6-bit-flip", nodes: 2, size: size, p50: took[0], max: took[1],
		note: fmt.Sprintf("byte %d of %s's cached copy flipped while stopped; %s (p50) and %s (max) read it right", off, x.name(), x.name(), other.name())})
	reliability.Record(t, reliability.Row{Area: "chaos",
		Case:    "one byte of a verified cached blob flipped on disk while peerd was stopped",
		Outcome: "the node itself and a peer both read the right bytes",
		Figure:  fmt.Sprintf("%s file; reads took %v (holder) and %v (peer)", human(size), took[0].Round(10*time.Millisecond), took[1].Round(10*time.Millisecond))})
}
