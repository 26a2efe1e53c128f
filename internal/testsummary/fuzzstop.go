package testsummary

import (
	"regexp"
	"strings"
)

// fuzzNoise are the lines of a `go test -fuzz` run that say nothing about
// why it failed: progress, the test's FAIL line, the exit status and the
// package's FAIL line.
var fuzzNoise = regexp.MustCompile(`^(fuzz: elapsed|warning: starting with empty corpus|--- FAIL: Fuzz\w* \(|exit status \d+$|FAIL$|FAIL\t)`)

// FuzzStopRace reports whether the output of a failed `go test -fuzz` run
// has the coordinator's bare "context deadline exceeded" as its only
// failure. Go 1.26's coordinator can report its own -fuzztime stop that way
// (golang/go#75804): it sees the deadline's Done before the deadline reaches
// the workers' context, so such a run fuzzed its whole time and no input
// failed. A failing input, a crashed worker or a failing seed adds lines of
// its own, and any line besides the noise keeps the run a failure.
func FuzzStopRace(out string) bool {
	var rest []string
	for _, l := range strings.Split(strings.ReplaceAll(out, "\r\n", "\n"), "\n") {
		if l != "" && !fuzzNoise.MatchString(l) {
			rest = append(rest, l)
		}
	}
	return len(rest) == 1 && rest[0] == "    context deadline exceeded"
}
