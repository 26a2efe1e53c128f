package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// benchCluster is row 7: the e2e harness's staggered and cold-burst pulls
// (network namespaces, containerd, a rate-limited registry; root). Its own
// table is carried over line by line.
func benchCluster(ctx context.Context, c *config, t *table) error {
	if os.Geteuid() != 0 {
		t.add(row{group: "7", what: "cluster", peerd: "skipped: needs root", verdict: "skipped"})
		return nil
	}
	cmd := exec.CommandContext(ctx, "go", "test", "-count=1", "-timeout", "60m", "-v",
		"-run", "^TestE2E$/^(1-staggered|2-cold-burst)$", "./e2e/")
	cmd.Env = append(os.Environ(), "E2E=1", "E2E_PEERD="+c.peerd)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = os.Stderr
	runErr := cmd.Run()
	sc := bufio.NewScanner(&out)
	found := false
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		for _, s := range []string{"staggered", "cold-burst", "cold burst"} {
			f := strings.Fields(line)
			if len(f) >= 8 && strings.HasPrefix(f[0], s) {
				found = true
				// scenario nodes size first p50 max egress/x peer-served [note]
				// The seeding node's pull is the lone pull: the slowest
				// follower's time is put next to it.
				rt := "-"
				first, err1 := time.ParseDuration(f[3])
				slowest, err2 := time.ParseDuration(f[5])
				if err1 == nil && err2 == nil && first > 0 {
					rt = fmt.Sprintf("slowest ÷ first %.2f", float64(slowest)/float64(first))
				}
				t.add(row{group: "7", what: fmt.Sprintf("cluster %s: %s nodes, %s; peer-served %s", f[0], f[1], f[2], f[7]),
					peerd:    fmt.Sprintf("first %s, p50 %s, max %s", f[3], f[4], f[5]),
					baseline: "egress ÷ image " + f[6], ratio: rt})
			}
		}
	}
	if runErr != nil {
		return fmt.Errorf("e2e: %v (output above)", runErr)
	}
	if !found {
		return fmt.Errorf("e2e printed no staggered/cold-burst rows")
	}
	return nil
}
