// Package testsummary reads the event stream of `go test -json`, echoes it
// as go test's own non-verbose output (failures with their logs, the
// "ok"/"FAIL" line of each package, build errors), and summarises the run:
// how many tests passed, failed and were skipped, and each skip's reason.
package testsummary

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/peerd-project/peerd/internal/testenv"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action      string
	Package     string
	Test        string
	Output      string
	ImportPath  string // build-output events
	FailedBuild string
}

// Skip is one skipped test and the reason it logged.
type Skip struct {
	Package, Test, Reason string
}

// Environment reports whether the skip is for a missing environment
// (internal/testenv), which CI's setup must provide.
func (s Skip) Environment() bool { return strings.HasPrefix(s.Reason, testenv.Prefix) }

// Result counts one run's tests (subtests included) by outcome.
type Result struct {
	Passed, Failed int
	Skips          []Skip
	// FailedPackages are packages that failed without a failing test
	// (a build error, a panic in TestMain, a timeout).
	FailedPackages []string
}

// Filter reads go test -json events from r and writes go test's non-verbose
// output to w: each package's closing lines, build errors, and the log of
// every failing test. Lines it cannot parse are copied as they are.
func Filter(r io.Reader, w io.Writer) (Result, error) {
	var res Result
	logs := map[[2]string][]string{} // package, test -> output so far
	failedTests := map[string]bool{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			fmt.Fprintf(w, "%s\n", line)
			continue
		}
		key := [2]string{e.Package, e.Test}
		switch {
		case e.Action == "build-output":
			io.WriteString(w, e.Output)
		case e.Test == "":
			switch e.Action {
			case "output":
				// "PASS" alone is what -v adds before "ok"; non-verbose go test omits it.
				if e.Output != "PASS\n" {
					io.WriteString(w, e.Output)
				}
			case "fail":
				if !failedTests[e.Package] {
					res.FailedPackages = append(res.FailedPackages, e.Package)
				}
			}
		case e.Action == "output":
			logs[key] = append(logs[key], e.Output)
		case e.Action == "pass":
			res.Passed++
			delete(logs, key)
		case e.Action == "fail":
			res.Failed++
			failedTests[e.Package] = true
			for _, l := range logs[key] {
				if !isMarker(l) {
					io.WriteString(w, l)
				}
			}
			delete(logs, key)
		case e.Action == "skip":
			res.Skips = append(res.Skips, Skip{Package: e.Package, Test: e.Test, Reason: skipReason(logs[key])})
			delete(logs, key)
		}
	}
	return res, sc.Err()
}

// isMarker reports whether l is one of the lines -v adds that non-verbose
// go test does not print.
func isMarker(l string) bool {
	t := strings.TrimSpace(l)
	for _, p := range []string{"=== RUN", "=== PAUSE", "=== CONT", "=== NAME"} {
		if strings.HasPrefix(t, p) {
			return true
		}
	}
	return false
}

// skipReason is what a skipped test logged: its t.Skip message and any
// t.Log before it, without the file:line prefixes.
func skipReason(lines []string) string {
	var out []string
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || isMarker(l) || strings.HasPrefix(t, "--- SKIP") {
			continue
		}
		// "file_test.go:123: message"
		if i := strings.Index(t, ": "); i > 0 && strings.Contains(t[:i], ".go:") {
			t = t[i+2:]
		}
		out = append(out, t)
	}
	if len(out) == 0 {
		return "(no reason given)"
	}
	return strings.Join(out, " / ")
}

// Report writes the summary of the named runs to w and returns the skips
// for a missing environment.
func Report(w io.Writer, names []string, runs []Result) []Skip {
	var env []Skip
	fmt.Fprintln(w, "\n== test summary ==")
	for i, r := range runs {
		fmt.Fprintf(w, "%s: %d passed, %d failed, %d skipped", names[i], r.Passed, r.Failed, len(r.Skips))
		if len(r.FailedPackages) > 0 {
			fmt.Fprintf(w, "; packages failed outside a test: %s", strings.Join(r.FailedPackages, ", "))
		}
		fmt.Fprintln(w)
		skips := append([]Skip(nil), r.Skips...)
		sort.Slice(skips, func(a, b int) bool {
			if skips[a].Package != skips[b].Package {
				return skips[a].Package < skips[b].Package
			}
			return skips[a].Test < skips[b].Test
		})
		for _, s := range skips {
			fmt.Fprintf(w, "  SKIP %s %s: %s\n", shortPkg(s.Package), s.Test, s.Reason)
			if s.Environment() {
				env = append(env, s)
			}
		}
	}
	return env
}

func shortPkg(p string) string {
	if i := strings.Index(p, "/peerd/"); i >= 0 {
		return p[i+len("/peerd/"):]
	}
	return p
}
