package sourcetest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/peerd-project/peerd/blob"
)

// mutant is the reference source with one rule broken.
type mutant struct {
	memSource
	mode string
}

func (m mutant) Fetch(ctx context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	switch m.mode {
	case "ignores-context":
		ctx = context.Background()
	case "leaks-a-goroutine":
		go func() { select {} }()
	case "wrong-size":
		rc, _, err := m.memSource.Fetch(ctx, k, off, n)
		return rc, 5, err
	case "not-found-is-another-error":
		if _, ok := m.b.Data[k]; !ok && k != m.b.Slow {
			return nil, -1, errors.New("no such blob")
		}
	case "does-not-hold-the-slow-blob":
		if k == m.b.Slow {
			return nil, -1, fmt.Errorf("%s: %w", k, blob.ErrNotFound)
		}
	case "no-short-read":
		if data, ok := m.b.Data[k]; ok && off+n > int64(len(data)) {
			return nil, -1, fmt.Errorf("range %d+%d past the end", off, n)
		}
	}
	return m.memSource.Fetch(ctx, k, off, n)
}

const mutantEnv = "PEERD_SOURCETEST_MUTANT"

// TestMutant runs the suite against the mutant named in the environment;
// TestSuiteCatchesBrokenSources runs it in a child process and expects it
// to fail.
func TestMutant(t *testing.T) {
	mode := os.Getenv(mutantEnv)
	if mode == "" {
		return // a child process of TestSuiteCatchesBrokenSources, run with mutantEnv set
	}
	Run(t, Options{}, func(t *testing.T, b Blobs) Fixture {
		src := mutant{memSource{b}, mode}
		return Fixture{Source: func(blob.Key) blob.Source { return src }}
	})
}

// Each broken rule fails the check meant for it: the suite can fail.
func TestSuiteCatchesBrokenSources(t *testing.T) {
	cases := map[string]string{
		"wrong-size":                 "WholeBlob",
		"not-found-is-another-error": "UnknownKeyIsNotFound",
		"no-short-read":              "RangePastTheEnd",
		"leaks-a-goroutine":          "NoGoroutineLeft",
		"ignores-context":            "CancelWhileReading",
		// A fixture whose slow blob is missing would pass the cancel
		// check with its "not found": the suite refuses it.
		"does-not-hold-the-slow-blob": "CancelWhileReading",
	}
	for mode, check := range cases {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], "-test.run=^TestMutant$/^"+check+"$", "-test.v")
			cmd.Env = append(os.Environ(), mutantEnv+"="+mode)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("the suite passed a source that breaks %q:\n%s", mode, out)
			}
			if !strings.Contains(string(out), "--- FAIL: TestMutant/"+check+" ") {
				t.Fatalf("a source that breaks %q did not fail TestMutant/%s:\n%s", mode, check, out)
			}
		})
	}
}

// localMutant is the reference local store with one rule broken.
type localMutant struct {
	memLocal
	mode string
}

func (m localMutant) OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	data, ok := m.memLocal[k]
	switch {
	case m.mode == "no-clamp" && ok && off+n > int64(len(data)):
		return nil, -1, fmt.Errorf("%s: %w", k, blob.ErrNotFound)
	case m.mode == "no-to-the-end" && n < 0:
		return io.NopCloser(strings.NewReader("")), int64(len(data)), nil
	case m.mode == "not-found-is-another-error" && !ok:
		return nil, -1, errors.New("no such blob")
	}
	return m.memLocal.OpenLocal(k, off, n)
}

func TestLocalMutant(t *testing.T) {
	mode := os.Getenv(mutantEnv)
	if mode == "" {
		return // a child process of TestLocalSuiteCatchesBrokenStores, run with mutantEnv set
	}
	RunLocal(t, LocalOptions{}, func(t *testing.T, blobs map[blob.Key][]byte) Local {
		return localMutant{memLocal(blobs), mode}
	})
}

func TestLocalSuiteCatchesBrokenStores(t *testing.T) {
	cases := map[string]string{
		"no-clamp":                   "RangePastTheEnd",
		"no-to-the-end":              "WholeBlob",
		"not-found-is-another-error": "UnknownKeyIsNotFound",
	}
	for mode, check := range cases {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], "-test.run=^TestLocalMutant$/^"+check+"$", "-test.v")
			cmd.Env = append(os.Environ(), mutantEnv+"="+mode)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("the suite passed a store that breaks %q:\n%s", mode, out)
			}
			if !strings.Contains(string(out), "--- FAIL: TestLocalMutant/"+check+" ") {
				t.Fatalf("a store that breaks %q did not fail TestLocalMutant/%s:\n%s", mode, check, out)
			}
		})
	}
}
