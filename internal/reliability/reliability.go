// Package reliability lets a test that proves a probe, a chaos scenario or a load figure record
// one row of the README's "Reliability" table, so the table is regenerated from the run that
// proves it rather than typed in.
//
// A row is appended as one JSON line to the file named by $PEERD_RELIABILITY_OUT; without that
// variable Record does nothing, so ordinary test runs leave no trace.
package reliability

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
)

// Env names the file rows are appended to.
const Env = "PEERD_RELIABILITY_OUT"

// Row is one line of the table.
type Row struct {
	// Area groups rows: "probe", "chaos", "load", "crash".
	Area string `json:"area"`
	// Case says what was done to peerd, e.g. "302 from an allowed origin to a host not allowed".
	Case string `json:"case"`
	// Outcome says what peerd did, e.g. "403, the other host never contacted".
	Outcome string `json:"outcome"`
	// Figure is the measured number behind the outcome, if any ("p99 3.1 ms, 0 errors of 1000").
	Figure string `json:"figure,omitempty"`
	// Test is the test that proved it (filled by Record from t.Name()).
	Test string `json:"test"`
}

// Namer is the part of testing.TB that Record needs.
type Namer interface {
	Name() string
	Helper()
	Logf(format string, args ...any)
}

var mu sync.Mutex

// Record appends row to $PEERD_RELIABILITY_OUT (if set) with the test's name, and logs it.
// Call it only after the assertions that prove the row have passed.
func Record(t Namer, row Row) {
	t.Helper()
	row.Test = t.Name()
	t.Logf("reliability: %s: %s → %s %s", row.Area, row.Case, row.Outcome, row.Figure)
	path := os.Getenv(Env)
	if path == "" {
		return
	}
	line, err := json.Marshal(row)
	if err != nil {
		t.Logf("reliability: %v", err)
		return
	}
	mu.Lock()
	defer mu.Unlock()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		t.Logf("reliability: %v", err)
		return
	}
	defer f.Close()
	if _, err := fmt.Fprintf(f, "%s\n", line); err != nil {
		t.Logf("reliability: %v", err)
	}
}

// Fuzzer is the part of *testing.F that RecordFuzz needs.
type Fuzzer interface {
	Namer
	Cleanup(func())
	Failed() bool
}

// RecordFuzz records, when the fuzz target f ends, the row of a target that
// found a bug: from a plain test run that replayed its seed corpus (the
// found inputs among it, counted in n) without a failure. Fuzzing runs
// (go test -fuzz, make fuzz) record nothing.
func RecordFuzz(f Fuzzer, n *atomic.Int64, target, outcome string) {
	f.Cleanup(func() {
		if fl := flag.Lookup("test.fuzz"); f.Failed() || n.Load() == 0 || fl != nil && fl.Value.String() != "" {
			return
		}
		Record(f, Row{Area: "probe", Case: "fuzzing " + target + " for 30 s", Outcome: outcome,
			Figure: fmt.Sprintf("%d seed and corpus inputs replayed, 0 failures", n.Load())})
	})
}
