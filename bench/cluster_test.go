package main

import (
	"slices"
	"strings"
	"testing"
)

func TestParseE2ERows(t *testing.T) {
	out := `=== RUN   TestE2E/1-staggered
    harness_test.go:1178: scenario         nodes       size    first      p50      max egress/x  peer-served  note
        1-staggered          4  100.0 MiB    5.64s    2.71s    2.99s     1.07    303.2 MiB  ctr pull, containerd 2
e2e results (egress/x = origin egress ÷ size):
scenario         nodes       size    first      p50      max egress/x  peer-served  note
1-staggered          4  100.0 MiB    5.60s    2.70s    2.98s     1.06    303.0 MiB  ctr pull
2-cold-burst         4  100.0 MiB        -    6.66s    7.15s     1.22    278.1 MiB  all nodes at once (baseline)
3-streaming          4  100.0 MiB    4.75s    3.03s    3.14s     1.49    255.3 MiB  other
`
	rows := parseE2ERows(strings.NewReader(out), clusterScenarios["cluster"]...)
	if len(rows) != 2 {
		t.Fatalf("got %d rows, want 2: %+v", len(rows), rows)
	}
	want := e2eRow{scenario: "1-staggered", nodes: "4", size: "100.0 MiB", first: "5.60s", p50: "2.70s", max: "2.98s", egress: "1.06", peerServed: "303.0 MiB", note: "ctr pull"}
	if rows["1-staggered"] != want {
		t.Errorf("staggered: got %+v, want the last line's %+v", rows["1-staggered"], want)
	}
	if cb := rows["2-cold-burst"]; cb.first != "-" || cb.max != "7.15s" || cb.egress != "1.22" {
		t.Errorf("cold burst: %+v", cb)
	}
}

func TestModelRows(t *testing.T) {
	out := `e2e results (egress/x = origin egress ÷ size; first = the seeding node's time; p50/max over the other nodes):
scenario         nodes       size    first      p50      max egress/x  peer-served  note
7-model-burst        4  100.0 MiB     4.7s    5.75s    6.06s     1.01    300.0 MiB  model.safetensors by reference through the mount, header then 64 tensors shuffled; slowest 1.29× one node alone (egress 1.04×); cold header p50 10.4ms vs the registry's own 6ms, added p50 4.8ms max 107.4ms (9 cold artifacts); burst headers p50 298.6ms
8-model-warm         4  100.0 MiB    4.65s    2.83s     4.9s     1.30    300.0 MiB  peerd warm on node 1 (registry 1.00× the model), then on the others at once; reading the model through every mount afterwards took 0 B from the registry
`
	rows := parseE2ERows(strings.NewReader(out), clusterScenarios["model"]...)
	if len(rows) != 2 {
		t.Fatalf("got %d rows, want 2: %+v", len(rows), rows)
	}
	var tb table
	modelRows(&tb, rows)
	want := []row{
		{group: "10", peerd: "6.06s", baseline: "one node alone 4.7s", ratio: "1.29", goal: "≤ 1.5×", verdict: "met"},
		{group: "10", peerd: "1.01", goal: "≤ 1.2×", verdict: "met"},
		{group: "10", peerd: "10.4ms", baseline: "6ms the registry's own first bytes", ratio: "+4.8ms", goal: "added ≤ 20 ms", verdict: "met"},
		{group: "10", peerd: "1.30", baseline: "node 1 4.65s, the others p50 2.83s / max 4.9s", goal: "≈ 1×", verdict: "MISSED"},
	}
	if len(tb.rows) != len(want) {
		t.Fatalf("got %d rows, want %d: %+v", len(tb.rows), len(want), tb.rows)
	}
	for i, w := range want {
		g := tb.rows[i]
		g.what = ""
		if g != w {
			t.Errorf("row %d: got %+v, want %+v", i, g, w)
		}
	}
	if !strings.Contains(tb.rows[2].what, "p50 of 9 artifacts (added: the median of each artifact's mount − registry; max 107.4ms)") || !strings.Contains(tb.rows[3].what, "then 3 more nodes") {
		t.Errorf("row texts: %q, %q", tb.rows[2].what, tb.rows[3].what)
	}
}

func TestGroupLess(t *testing.T) {
	got := []string{"10", "3b", "9", "1", "3", "2"}
	slices.SortStableFunc(got, func(a, b string) int {
		if groupLess(a, b) {
			return -1
		}
		if groupLess(b, a) {
			return 1
		}
		return 0
	})
	if want := []string{"1", "2", "3", "3b", "9", "10"}; !slices.Equal(got, want) {
		t.Errorf("groups in order: %v, want %v", got, want)
	}
}
