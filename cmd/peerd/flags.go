package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"

	ctrd "github.com/peerd-project/peerd/containerd"
)

func newFlagSet(name, summary string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: peerd %s [flags]\n\n%s\n\nflags (each also read from PEERD_<FLAG>):\n", name, summary)
		fs.PrintDefaults()
	}
	return fs
}

// parse applies PEERD_<NAME> environment variables, then the command line
// (which wins).
func parse(fs *flag.FlagSet, args []string) error {
	var errs []string
	fs.VisitAll(func(f *flag.Flag) {
		env := envName(f.Name)
		if v, ok := os.LookupEnv(env); ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Sprintf("%s=%q: %v", env, v, err))
			}
		}
	})
	if len(errs) > 0 {
		return fmt.Errorf("bad environment: %s", strings.Join(errs, "; "))
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 && !positional[fs] {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	return nil
}

// positional marks the flag sets of commands that take arguments after
// their flags (fs.Args).
var positional = map[*flag.FlagSet]bool{}

// listFlag is a repeatable flag; each value may also hold comma-separated
// items. Values from the environment and the command line add up.
type listFlag struct {
	items []string
}

func (l *listFlag) String() string { return strings.Join(l.items, ",") }
func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			l.items = append(l.items, s)
		}
	}
	return nil
}

// registryList is a listFlag of registry entries, each checked by
// containerd.ParseRegistry as it is set, so that a bad entry from the
// command line or the environment stops the command before it starts
// anything, with the entry and what is expected.
type registryList struct{ listFlag }

func (l *registryList) Set(v string) error {
	var add listFlag
	add.Set(v)
	for _, r := range add.items {
		if _, err := ctrd.ParseRegistry(r); err != nil {
			return err
		}
	}
	l.items = append(l.items, add.items...)
	return nil
}

// byteSize is a flag of bytes with an optional unit: 512, 64KiB, 1MiB, 20GiB, 1G, 1.5TiB.
type byteSize int64

func (b *byteSize) String() string { return formatBytes(int64(*b)) }
func (b *byteSize) Set(v string) error {
	n, err := parseBytes(v)
	if err != nil {
		return err
	}
	*b = byteSize(n)
	return nil
}

var units = []struct {
	suffix string
	mult   float64
}{
	{"kib", 1 << 10}, {"mib", 1 << 20}, {"gib", 1 << 30}, {"tib", 1 << 40},
	{"kb", 1e3}, {"mb", 1e6}, {"gb", 1e9}, {"tb", 1e12},
	{"ki", 1 << 10}, {"mi", 1 << 20}, {"gi", 1 << 30}, {"ti", 1 << 40},
	{"k", 1e3}, {"m", 1e6}, {"g", 1e9}, {"t", 1e12}, {"b", 1},
}

func parseBytes(v string) (int64, error) {
	s := strings.ToLower(strings.TrimSpace(v))
	mult := 1.0
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || !(f >= 0) || f*mult > 1<<62 { // !(f >= 0) also refuses NaN
		return 0, fmt.Errorf("bad size %q (want e.g. 512, 64KiB, 1MiB, 20GiB)", v)
	}
	return int64(f * mult), nil
}

func formatBytes(n int64) string {
	for _, u := range []struct {
		s string
		m int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n >= u.m && n%u.m == 0 {
			return strconv.FormatInt(n/u.m, 10) + u.s
		}
	}
	return strconv.FormatInt(n, 10)
}
