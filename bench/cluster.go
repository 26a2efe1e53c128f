package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"
)

// e2eRow is one scenario line of the e2e harness's table:
// scenario nodes size first p50 max egress/x peer-served note.
type e2eRow struct {
	scenario, nodes, size, first, p50, max, egress, peerServed string
}

// parseE2ERows picks the staggered and cold-burst lines out of `go test -v
// ./e2e/` output (the harness logs each row and prints them all again at the
// end; the last one wins).
func parseE2ERows(r io.Reader) map[string]e2eRow {
	out := map[string]e2eRow{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 10 || (f[0] != "1-staggered" && f[0] != "2-cold-burst") {
			continue
		}
		// Sizes are "<number> <unit>": 100.0 MiB, 1.00 GiB.
		out[f[0]] = e2eRow{scenario: f[0], nodes: f[1], size: f[2] + " " + f[3], first: f[4], p50: f[5], max: f[6],
			egress: f[7], peerServed: f[8] + " " + f[9]}
	}
	return out
}

// benchCluster is row 8: the e2e harness's staggered and cold-burst pulls
// (network namespaces, containerd, a rate-limited registry; root). The lone
// pull is the staggered scenario's first node, which pulls with nobody to
// share with; the slowest follower of each scenario is put next to it.
func benchCluster(ctx context.Context, c *config, t *table) error {
	if os.Geteuid() != 0 {
		t.add(row{group: "8", what: "cluster", peerd: "skipped: needs root", verdict: "skipped"})
		return nil
	}
	// The harness waits up to 30 min for another e2e run's lock; the
	// table should not wait that long.
	ctx, cancel := context.WithTimeout(ctx, 20*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "test", "-count=1", "-timeout", "60m", "-v",
		"-run", "^TestE2E$/^(1-staggered|2-cold-burst)$", "./e2e/")
	cmd.Env = append(os.Environ(), "E2E=1", "E2E_PEERD="+c.peerd)
	var out bytes.Buffer
	cmd.Stdout = io.MultiWriter(&out, os.Stderr)
	cmd.Stderr = os.Stderr
	runErr := cmd.Run()
	rows := parseE2ERows(&out)
	lone, _ := time.ParseDuration(rows["1-staggered"].first)
	for _, name := range []string{"1-staggered", "2-cold-burst"} {
		r, ok := rows[name]
		if !ok {
			continue
		}
		rt := "-"
		if slowest, err := time.ParseDuration(r.max); err == nil && lone > 0 {
			rt = fmt.Sprintf("%.2f", float64(slowest)/float64(lone))
		}
		t.add(row{group: "8", what: fmt.Sprintf("cluster %s: %s nodes, image %s; registry egress ÷ image %s; peer-served %s", name, r.nodes, r.size, r.egress, r.peerServed),
			peerd: fmt.Sprintf("slowest node %s (p50 %s)", r.max, r.p50), baseline: "lone pull " + rows["1-staggered"].first, ratio: rt})
	}
	if runErr != nil {
		return fmt.Errorf("e2e: %v (output above)", runErr)
	}
	if len(rows) == 0 {
		return fmt.Errorf("e2e printed no staggered/cold-burst rows")
	}
	return nil
}
