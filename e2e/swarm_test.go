package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/testproc"
)

// TestSwarmBurst measures cold-burst swarming next to its baselines on one
// cluster (E2E_SWARM=1 make e2e, or E2E=1 E2E_SWARM=1 go test -run
// TestSwarmBurst ./e2e/; the table uses E2E_NODES=4 and 8,
// E2E_IMAGE_SIZE=200MiB, E2E_RATE=100mbit):
//
//	lone-direct   node 1 alone pulls straight from the registry (the reference time)
//	lone-peerd    node 1 alone pulls through its peerd (pull-through)
//	burst-direct  every node pulls straight from the registry at once (no p2p at all)
//	burst-swarm   every node pulls through its peerd at once
//
// Each step uses its own image, so no cache helps another. Asserted: every
// pull succeeds, and the swarm's registry egress is at most 1.2× the image.
// The slowest swarm node's time over the lone direct pull is reported (the
// issue's goal is ≤ 1.5×), not asserted: wall-clock ratios on a shared
// machine are not a test.
func TestSwarmBurst(t *testing.T) {
	if os.Getenv("E2E_SWARM") != "1" {
		t.Skip("the swarm measurement runs with E2E_SWARM=1 (its own cluster; make e2e covers the bound in scenario 2)")
	}
	c := newCluster(t)
	t.Cleanup(func() { printRows(os.Stdout) })
	c.need(t, "p2p", "containerd")
	if !c.hasFlag("pull-through") {
		t.Fatal("this peerd build lacks --pull-through: a missing feature is a failure, not a skip")
	}
	ctx := context.Background()
	n1 := c.nodes[:1]
	step := func(name string, seed uint64, nodes []*node, viaPeerd bool, note string) (time.Duration, float64) {
		t.Helper()
		im := c.pushImage(ctx, name, seed)
		defer c.removeEverywhere(im)
		e0, s0 := c.egress(), c.peerServed()
		ds, err := concurrently(nodes, func(n *node) (time.Duration, error) {
			if viaPeerd {
				return c.pull(ctx, n, im.ref)
			}
			return c.directPull(ctx, n, im.ref)
		})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		egress := c.egress() - e0
		p50, mx := stats(ds)
		c.report(row{scenario: name, nodes: len(nodes), size: im.size, p50: p50, max: mx,
			egress: egress, peerServed: c.peerServed() - s0, note: note})
		return mx, float64(egress) / float64(im.size)
	}
	lone, _ := step("lone-direct", 201, n1, false, "node 1 alone, straight from the registry (reference)")
	step("lone-peerd", 202, n1, true, "node 1 alone, through peerd's pull-through")
	if os.Getenv("E2E_SWARM_NO_DIRECT") != "1" { // skips the slowest step when comparing peerd builds
		step("burst-direct", 203, c.nodes, false, "all nodes at once, straight from the registry (no p2p)")
	}
	slowest, egress := step("burst-swarm", 204, c.nodes, true, "all nodes at once through peerd (pull-through + swarm)")
	t.Logf("swarm: registry egress %.2f× the image (bound 1.2×); slowest node %.2f× a lone direct pull (goal 1.5×)",
		egress, slowest.Seconds()/lone.Seconds())
	if egress > 1.2 {
		t.Fatalf("cold burst of %d nodes: registry sent %.2f× the image, want ≤ 1.2×", len(c.nodes), egress)
	}
}

// directPull pulls with no mirror: containerd talks to the registry itself.
func (c *cluster) directPull(ctx context.Context, n *node, ref string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "ip", nsExec(n.ns, n.ctr, "-a", n.sock, "-n", ctrdNS, "images", "pull", "--plain-http", "--snapshotter", c.cfg.Snapshotter, ref)[1:]...)
	cmd.Env = cleanEnv()
	out, err := cmd.CombinedOutput()
	d := time.Since(start)
	if err != nil {
		return d, fmt.Errorf("%s: ctr pull --plain-http %s: %w\n%s", n.name(), ref, err, testproc.LastLines(string(out), 15))
	}
	return d, nil
}
