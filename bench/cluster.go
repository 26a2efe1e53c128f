package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// e2eRow is one scenario line of the e2e harness's table:
// scenario nodes size first p50 max egress/x peer-served note.
type e2eRow struct {
	scenario, nodes, size, first, p50, max, egress, peerServed, note string
}

// parseE2ERows picks the lines of the named scenarios out of `go test -v
// ./e2e/` output (the harness logs each row and prints them all again at the
// end; the last one wins).
func parseE2ERows(r io.Reader, scenarios ...string) map[string]e2eRow {
	out := map[string]e2eRow{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 10 || !slices.Contains(scenarios, f[0]) {
			continue
		}
		// Sizes are "<number> <unit>": 100.0 MiB, 1.00 GiB.
		out[f[0]] = e2eRow{scenario: f[0], nodes: f[1], size: f[2] + " " + f[3], first: f[4], p50: f[5], max: f[6],
			egress: f[7], peerServed: f[8] + " " + f[9], note: strings.Join(f[10:], " ")}
	}
	return out
}

// clusterScenarios are the e2e scenarios behind row 8 (image pulls) and
// row 10 (a model through the mount, and peerd warm).
var clusterScenarios = map[string][]string{
	"cluster": {"1-staggered", "2-cold-burst"},
	"model":   {"7-model-burst", "8-model-warm"},
}

// benchCluster runs rows 8 and 10 from one e2e cluster (network
// namespaces, containerd, a rate-limited registry; root): the staggered and
// cold-burst pulls, whose lone pull is the staggered scenario's first node;
// and the model read through the mount by reference.
func benchCluster(ctx context.Context, c *config, t *table) error {
	var names []string
	for _, sec := range []string{"cluster", "model"} {
		if c.only == nil || c.only[sec] {
			names = append(names, clusterScenarios[sec]...)
		}
	}
	if os.Geteuid() != 0 {
		t.add(row{group: "8", what: "cluster and model scenarios", peerd: "skipped: needs root", verdict: "skipped"})
		return nil
	}
	// The harness waits up to 30 min for another e2e run's lock; the
	// table should not wait that long.
	ctx, cancel := context.WithTimeout(ctx, 25*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "test", "-count=1", "-timeout", "60m", "-v",
		"-run", "^TestE2E$/^("+strings.Join(names, "|")+")$", "./e2e/")
	cmd.Env = append(os.Environ(), "E2E=1", "E2E_PEERD="+c.peerd)
	var out bytes.Buffer
	cmd.Stdout = io.MultiWriter(&out, os.Stderr)
	cmd.Stderr = os.Stderr
	runErr := cmd.Run()
	rows := parseE2ERows(&out, names...)
	clusterRows(t, rows)
	modelRows(t, rows)
	if runErr != nil {
		return fmt.Errorf("e2e: %v (output above)", runErr)
	}
	if len(rows) == 0 {
		return fmt.Errorf("e2e printed none of the rows of %s", strings.Join(names, ", "))
	}
	return nil
}

// clusterRows is row 8: each pull scenario's slowest node beside the lone pull.
func clusterRows(t *table, rows map[string]e2eRow) {
	lone, _ := time.ParseDuration(rows["1-staggered"].first)
	for _, name := range clusterScenarios["cluster"] {
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
}

// coldHeaderRE reads scenario 7's cold header figures from its note.
var coldHeaderRE = regexp.MustCompile(`cold header p50 (\S+) vs the registry's own (\S+), added p50 (\S+) max (\S+) \((\d+) cold artifacts\)`)

// modelRows is row 10: the model burst's slowest reader beside one node
// reading alone, the registry's egress, the cold header's added time, and
// peerd warm's egress.
func modelRows(t *table, rows map[string]e2eRow) {
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "MISSED"
	}
	if r, ok := rows["7-model-burst"]; ok {
		alone, err1 := time.ParseDuration(r.first)
		slowest, err2 := time.ParseDuration(r.max)
		if err1 == nil && err2 == nil && alone > 0 {
			x := slowest.Seconds() / alone.Seconds()
			t.add(row{group: "10", what: fmt.Sprintf("model burst: %s nodes read a %s model through their mounts at once (header, then tensors shuffled); slowest node (p50 %s)", r.nodes, r.size, r.p50),
				peerd: r.max, baseline: "one node alone " + r.first, ratio: fmt.Sprintf("%.2f", x), goal: "≤ 1.5×", verdict: verdict(x <= 1.5)})
		}
		if e, err := strconv.ParseFloat(r.egress, 64); err == nil {
			t.add(row{group: "10", what: "model burst: registry egress ÷ model", peerd: r.egress, goal: "≤ 1.2×", verdict: verdict(e <= 1.2)})
		}
		if m := coldHeaderRE.FindStringSubmatch(r.note); m != nil {
			added, err := time.ParseDuration(m[3])
			if err == nil {
				t.add(row{group: "10", what: fmt.Sprintf("model: a cold node's header through the mount, p50 of %s artifacts (added: the median of each artifact's mount − registry; max %s)", m[5], m[4]),
					peerd: m[1], baseline: m[2] + " the registry's own first bytes", ratio: signed(m[3]),
					goal: "added ≤ 20 ms", verdict: verdict(added <= 20*time.Millisecond)})
			}
		}
	}
	if r, ok := rows["8-model-warm"]; ok {
		e, err := strconv.ParseFloat(r.egress, 64)
		if err == nil {
			t.add(row{group: "10", what: fmt.Sprintf("peerd warm on node 1, then %d more nodes at once (%s model): registry egress ÷ model", mustAtoi(r.nodes)-1, r.size),
				peerd: r.egress, baseline: fmt.Sprintf("node 1 %s, the others p50 %s / max %s", r.first, r.p50, r.max), goal: "≈ 1×", verdict: verdict(e <= 1.2)})
		}
	}
}

// signed shows a duration's sign: "+4.8ms", "-1.2ms".
func signed(d string) string {
	if strings.HasPrefix(d, "-") {
		return d
	}
	return "+" + d
}

func mustAtoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}
