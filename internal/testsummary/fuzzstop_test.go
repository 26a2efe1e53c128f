package testsummary

import (
	"os"
	"testing"
)

// Only the coordinator's bare deadline report counts as its stop race; a
// failing input (even one whose message is the same words), a crashed
// worker, a failing seed or a pass do not.
func TestFuzzStopRace(t *testing.T) {
	for name, want := range map[string]bool{
		// Real runs whose stop hit the race (made to happen every time by
		// delaying the deadline's cancellation of child contexts).
		"testdata/fuzz-stop-race.log":          true,
		"testdata/fuzz-stop-race-baseline.log": true,
		// A crasher's output (a real run, names changed) whose t.Fatal
		// message is the same words.
		"testdata/fuzz-crasher-deadline.log": false,
	} {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if got := FuzzStopRace(string(b)); got != want {
			t.Errorf("%s: FuzzStopRace = %v, want %v", name, got, want)
		}
	}
	for out, want := range map[string]bool{
		"--- FAIL: FuzzX (5.01s)\r\n    context deadline exceeded\r\nFAIL\r\n": true,
		"fuzz: elapsed: 5s, execs: 10 (2/sec), new interesting: 0 (total: 1)\n--- FAIL: FuzzX (5.02s)\n    fuzzing process hung or terminated unexpectedly: exit status 2\nFAIL\nexit status 1\nFAIL\tp\t5.0s\n": false,
		"failure while testing seed corpus entry: FuzzX/seed#0\n--- FAIL: FuzzX (0.01s)\n    context deadline exceeded\nFAIL\n":                                                                                  false,
		"--- FAIL: FuzzX (5.01s)\n    context deadline exceeded\n    context deadline exceeded\nFAIL\n":                                                                                                          false,
		"fuzz: elapsed: 5s, execs: 10 (2/sec), new interesting: 0 (total: 1)\nPASS\nok  \tp\t5.0s\n":                                                                                                             false,
		"": false,
	} {
		if got := FuzzStopRace(out); got != want {
			t.Errorf("FuzzStopRace(%q) = %v, want %v", out, got, want)
		}
	}
}
