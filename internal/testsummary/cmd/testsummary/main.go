// Command testsummary is how `make test` reads go test's output.
//
//	go test -json ./... | testsummary -save bin/test.json
//
// echoes go test's non-verbose output and keeps the event stream in a file;
//
//	testsummary -report bin/test.json [more.json ...]
//
// prints how many tests passed, failed and were skipped, with every skip's
// reason. Under CI=true the report fails when a test skipped for a missing
// environment (internal/testenv), which CI's setup must provide.
//
//	testsummary -fuzz-stop-race bin/fuzz/p2p-FuzzRecordStore.log
//
// exits 0 when a failed go test -fuzz run's only failure is the fuzz
// coordinator's report of its own -fuzztime stop (testsummary.FuzzStopRace),
// 1 otherwise.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/peerd-project/peerd/internal/testenv"
	"github.com/peerd-project/peerd/internal/testsummary"
)

func main() {
	save := flag.String("save", "", "read go test -json from stdin, print its readable form, and keep the events in this file")
	report := flag.Bool("report", false, "summarise the -json files named as arguments")
	fuzzStop := flag.String("fuzz-stop-race", "", "exit 0 if this go test -fuzz output fails only with the coordinator's bare -fuzztime stop report, 1 if not")
	flag.Parse()
	switch {
	case *fuzzStop != "":
		b, err := os.ReadFile(*fuzzStop)
		if err != nil {
			fatal(err)
		}
		if !testsummary.FuzzStopRace(string(b)) {
			os.Exit(1)
		}
	case *save != "":
		f, err := os.Create(*save)
		if err != nil {
			fatal(err)
		}
		// The events go to the file as they come, so an interrupted run
		// still leaves what it saw.
		if _, err := testsummary.Filter(io.TeeReader(os.Stdin, f), os.Stdout); err != nil {
			fatal(err)
		}
		if err := f.Close(); err != nil {
			fatal(err)
		}
	case *report:
		var names []string
		var runs []testsummary.Result
		for _, p := range flag.Args() {
			f, err := os.Open(p)
			if err != nil {
				fatal(err)
			}
			r, err := testsummary.Filter(f, io.Discard)
			f.Close()
			if err != nil {
				fatal(fmt.Errorf("%s: %w", p, err))
			}
			names = append(names, strings.TrimSuffix(filepath.Base(p), ".json"))
			runs = append(runs, r)
		}
		env := testsummary.Report(os.Stdout, names, runs)
		if len(env) > 0 {
			if testenv.CI() {
				fmt.Printf("FAIL: %d tests skipped for a missing environment under CI=true: the setup (tools/test-setup.sh) should have provided it\n", len(env))
				os.Exit(1)
			}
			fmt.Printf("%d of these skips are for a missing environment: run make test as root to set it up (tools/test-setup.sh)\n", len(env))
		}
	default:
		flag.Usage()
		os.Exit(2)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "testsummary:", err)
	os.Exit(1)
}
