package main

import (
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
	rows := parseE2ERows(strings.NewReader(out))
	if len(rows) != 2 {
		t.Fatalf("got %d rows, want 2: %+v", len(rows), rows)
	}
	want := e2eRow{scenario: "1-staggered", nodes: "4", size: "100.0 MiB", first: "5.60s", p50: "2.70s", max: "2.98s", egress: "1.06", peerServed: "303.0 MiB"}
	if rows["1-staggered"] != want {
		t.Errorf("staggered: got %+v, want the last line's %+v", rows["1-staggered"], want)
	}
	if cb := rows["2-cold-burst"]; cb.first != "-" || cb.max != "7.15s" || cb.egress != "1.22" {
		t.Errorf("cold burst: %+v", cb)
	}
}
