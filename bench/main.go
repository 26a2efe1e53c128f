// Command bench measures peerd's speed, cost and scale next to baselines
// measured in the same run, and prints one table (`make bench`).
//
// The machine it runs on is usually shared and noisy, so every figure is a
// ratio to a baseline taken alternately with it, over several rounds, and the
// median is reported; nothing here asserts a wall-clock time. Knobs (env):
//
//	BENCH_QUICK=1       small sizes, one counted round: a couple of minutes
//	BENCH_SIZE_MB       blob size for rows 1-3b and 6 (default 1024; quick 128)
//	BENCH_OBD_MB        blob size for row 7 (default 512; quick 128)
//	BENCH_ROUNDS        counted rounds after the uncounted warm-up (default 3; quick 1)
//	BENCH_DHT_NODES     nodes of the in-process DHT (default 100; quick 30); 0 skips row 5
//	BENCH_DHT_KEYS      lookups per kind in row 5 (default 200; quick 50)
//	BENCH_DHT_RESOLVE_TIMEOUT  row-5 peerd nodes' --resolve-timeout (default the daemon's 20ms)
//	BENCH_DHT_PER_PROCESS  most row-5 nodes in one process (default 100, 25 above 100 nodes); the rest run in child processes
//	BENCH_DHT_LOG       row-5 nodes log at this level (debug, info, warn) to stderr; child processes to <work>/dht-*.log
//	BENCH_STREAMS       concurrent range streams in row 6 (default 100)
//	BENCH_ONLY          comma-separated rows to run: hit,fuse,peer,peer4,dht,mem,obd,cluster,model,storm (storm only when named)
//	BENCH_STORM_NODES   nodes of the start storm, row 9 (default 300); BENCH_STORM_MODES k8s-lease,dns; BENCH_STORM_PER_PROCESS (25)
//	BENCH_SETTLE_MS     pause before each run of rows 3, 3b and 7 (default 3000)
//	BENCH_CLUSTER=1     also run the e2e cluster and model scenarios, rows 8 and 10 (root; slow)
//	BENCH_PPROF=<dir>   save CPU profiles of peerd while it serves (rows 1 and 3)
//	BENCH_DIR=<dir>     work folder (default a temp dir; removed afterwards)
//	PEERD_BIN           the peerd binary (default: built from ./cmd/peerd)
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	golog "github.com/ipfs/go-log/v2"
)

type config struct {
	peerd    string
	work     string
	sizeMB   int64
	rounds   int
	dhtNodes int
	dhtKeys  int
	// dhtPerProcess is the most row-5 nodes one process hosts; larger
	// networks put the rest in child processes.
	dhtPerProcess int
	// dhtResolve is the row-5 peerd nodes' --resolve-timeout.
	dhtResolve time.Duration
	streams    int
	obdMB      int64
	only       map[string]bool
	cluster    bool
	pprof      string
	quick      bool
}

func (c *config) size() int64 { return c.sizeMB << 20 }

func (c *config) want(row string) bool {
	if row == "storm" {
		// Hundreds of nodes for minutes: only when asked for.
		return c.only["storm"]
	}
	return len(c.only) == 0 || c.only[row]
}

func envInt(name string, def int) int {
	if v := os.Getenv(name); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			fmt.Fprintf(os.Stderr, "bench: %s=%q: want a non-negative integer\n", name, v)
			os.Exit(2)
		}
		return n
	}
	return def
}

func signalNotify(c chan os.Signal) { signal.Notify(c, syscall.SIGTERM, syscall.SIGINT) }

// row is one line of the table.
type row struct {
	group    string
	what     string
	peerd    string
	baseline string
	ratio    string
	goal     string
	verdict  string
}

type table struct {
	rows  []row
	notes []string
}

func (t *table) add(r row) {
	t.rows = append(t.rows, r)
	fmt.Fprintf(os.Stderr, "bench: %s | %s | %s | %s | %s\n", r.group, r.what, r.peerd, r.baseline, r.ratio)
}

func (t *table) fail(group string, err error) {
	t.add(row{group: group, what: "FAILED", peerd: strings.ReplaceAll(err.Error(), "\n", " "), verdict: "error"})
}

func (t *table) note(f string, a ...any) {
	s := fmt.Sprintf(f, a...)
	t.notes = append(t.notes, s)
	fmt.Fprintln(os.Stderr, "bench: note:", s)
}

// atLeast and atMost format a verdict against a goal.
func atLeast(v, goal float64) string {
	if v >= goal {
		return "met"
	}
	return "MISSED"
}

func atMost(v, goal float64) string {
	if v <= goal {
		return "met"
	}
	return "MISSED"
}

func (t *table) print(w io.Writer, c *config) {
	fmt.Fprintf(w, "\npeerd bench — %s, %d CPUs, blob %d MiB, %d counted rounds (medians), %s\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), runtime.NumCPU(), c.sizeMB, c.rounds, kernel())
	fmt.Fprintln(w, "| # | measure | peerd | baseline (same run) | ratio | goal | |")
	fmt.Fprintln(w, "| - | --- | ---: | ---: | ---: | --- | --- |")
	// Rows in the order of the issue, whichever section measured them.
	rows := slices.Clone(t.rows)
	sort.SliceStable(rows, func(i, j int) bool { return groupLess(rows[i].group, rows[j].group) })
	for _, r := range rows {
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n", r.group, r.what, r.peerd, r.baseline, r.ratio, r.goal, r.verdict)
	}
	if len(t.notes) > 0 {
		fmt.Fprintln(w)
		for _, n := range t.notes {
			fmt.Fprintf(w, "- %s\n", n)
		}
	}
}

// groupLess orders row groups by number, then suffix: 3 < 3b < 9 < 10.
func groupLess(a, b string) bool {
	num := func(s string) (int, string) {
		i := 0
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
		}
		n, _ := strconv.Atoi(s[:i])
		return n, s[i:]
	}
	na, sa := num(a)
	nb, sb := num(b)
	if na != nb {
		return na < nb
	}
	return sa < sb
}

func kernel() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "linux"
	}
	return "Linux " + strings.TrimSpace(string(b))
}

func main() {
	if (len(os.Args) == 4 || len(os.Args) == 5) && os.Args[1] == "fileserver" {
		runFileServer(os.Args[2:])
		return
	}
	if len(os.Args) == 2 && os.Args[1] == "ttfb-client" {
		runTTFBClient()
		return
	}
	if len(os.Args) == 2 && os.Args[1] == "dht-host" {
		raiseFileLimit()
		golog.SetAllLoggers(golog.LevelFatal)
		os.Exit(runDHTHost())
	}
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: peerd-bench (configured by BENCH_* environment variables; see bench/README.md)")
		os.Exit(2)
	}
	quick := os.Getenv("BENCH_QUICK") != "" && os.Getenv("BENCH_QUICK") != "0"
	c := &config{quick: quick}
	def := func(full, q int) int {
		if quick {
			return q
		}
		return full
	}
	c.sizeMB = int64(envInt("BENCH_SIZE_MB", def(1024, 128)))
	if c.sizeMB < 8 {
		fmt.Fprintln(os.Stderr, "bench: BENCH_SIZE_MB must be at least 8")
		os.Exit(2)
	}
	c.rounds = max(1, envInt("BENCH_ROUNDS", def(3, 1)))
	c.dhtNodes = envInt("BENCH_DHT_NODES", def(100, 30))
	c.dhtKeys = max(10, envInt("BENCH_DHT_KEYS", def(200, 50)))
	// 100 nodes of a 100-node network hold ~10,000 descriptors; in a
	// network of 500 a node keeps up to 400 connections (peerd's
	// connection manager) and its data-plane connections.
	c.dhtPerProcess = max(12, envInt("BENCH_DHT_PER_PROCESS", 100))
	if c.dhtNodes > 100 && os.Getenv("BENCH_DHT_PER_PROCESS") == "" {
		c.dhtPerProcess = 25
	}
	c.dhtResolve = 20 * time.Millisecond
	if v := os.Getenv("BENCH_DHT_RESOLVE_TIMEOUT"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			fmt.Fprintln(os.Stderr, "bench: BENCH_DHT_RESOLVE_TIMEOUT must be a positive duration such as 20ms")
			os.Exit(2)
		}
		c.dhtResolve = d
	}
	c.streams = max(1, envInt("BENCH_STREAMS", 100))
	c.obdMB = int64(envInt("BENCH_OBD_MB", def(512, 128)))
	if c.obdMB < 1 {
		fmt.Fprintln(os.Stderr, "bench: BENCH_OBD_MB must be at least 1")
		os.Exit(2)
	}
	c.cluster = os.Getenv("BENCH_CLUSTER") != "" && os.Getenv("BENCH_CLUSTER") != "0"
	c.pprof = os.Getenv("BENCH_PPROF")
	if v := os.Getenv("BENCH_ONLY"); v != "" {
		c.only = map[string]bool{}
		for _, s := range strings.Split(v, ",") {
			c.only[strings.TrimSpace(s)] = true
		}
		c.cluster = c.cluster || c.only["cluster"] || c.only["model"]
	}

	raiseFileLimit()
	// The libp2p nodes of row 5 are many; their log lines are not figures.
	golog.SetAllLoggers(golog.LevelFatal)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, c))
}

// raiseFileLimit raises the descriptor limit as far as we may (root: up
// to fs.nr_open): row 5's processes hold two sockets per connection
// between two of their own nodes.
func raiseFileLimit() {
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil {
		want := syscall.Rlimit{Cur: 1 << 20, Max: 1 << 20}
		if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want) != nil {
			lim.Cur = lim.Max
			syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
		}
	}
}

func run(ctx context.Context, c *config) int {
	var err error
	c.work = os.Getenv("BENCH_DIR")
	if c.work == "" {
		if c.work, err = os.MkdirTemp("", "peerd-bench-"); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 1
		}
		defer os.RemoveAll(c.work)
	} else if err := os.MkdirAll(c.work, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	if c.pprof != "" {
		if err := os.MkdirAll(c.pprof, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 1
		}
	}
	c.peerd = os.Getenv("PEERD_BIN")
	if c.peerd == "" {
		c.peerd = filepath.Join(c.work, "peerd")
		build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", c.peerd, "./cmd/peerd")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "bench: build peerd (run from the repository root or set PEERD_BIN):", err)
			return 1
		}
	}
	t := &table{}
	sections := []struct {
		name, group string
		f           func(context.Context, *config, *table) error
	}{
		{"hit", "1", benchHit},
		{"fuse", "2", benchFUSE},
		{"peer", "3", benchPeer},
		{"peer4", "3b", benchPeer4},
		{"dht", "5", benchDHT},
		{"mem", "6", benchMemory},
		{"obd", "7", benchOBD},
		{"storm", "9", benchStorm},
	}
	for _, s := range sections {
		if !c.want(s.name) {
			continue
		}
		if ctx.Err() != nil {
			break
		}
		fmt.Fprintf(os.Stderr, "bench: --- %s ---\n", s.name)
		start := time.Now()
		if err := s.f(ctx, c, t); err != nil {
			t.fail(s.group, fmt.Errorf("%s: %w", s.name, err))
		}
		fmt.Fprintf(os.Stderr, "bench: %s took %v\n", s.name, time.Since(start).Round(time.Second))
	}
	if c.cluster && ctx.Err() == nil {
		if err := benchCluster(ctx, c, t); err != nil {
			t.fail("8", err)
		}
	}
	t.print(os.Stdout, c)
	if ctx.Err() != nil {
		return 130
	}
	return 0
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func ratios(a, b []float64) []float64 {
	r := make([]float64, 0, len(a))
	for i := range a {
		if i < len(b) && b[i] > 0 {
			r = append(r, a[i]/b[i])
		}
	}
	return r
}

func quantile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[int(float64(len(s)-1)*p+0.5)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }

func mibs(v float64) string { return fmt.Sprintf("%.0f MiB/s", v) }
