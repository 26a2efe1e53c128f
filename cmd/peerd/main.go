// Command peerd is the node daemon: it shares container images and large
// content-addressed files between the nodes of a cluster.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime/debug"
	"sort"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type command struct {
	summary string
	run     func(args []string) error
}

var commands = map[string]command{}

func register(name, summary string, run func(args []string) error) {
	commands[name] = command{summary: summary, run: run}
}

func init() {
	register("version", "print the version", func(args []string) error {
		fs := newFlagSet("version", "print peerd's version and build information")
		if err := parse(fs, args); err != nil {
			return err
		}
		fmt.Println(versionString())
		return nil
	})
}

func versionString() string {
	s := "peerd " + version
	if bi, ok := debug.ReadBuildInfo(); ok {
		s += " (" + bi.GoVersion + ")"
	}
	return s
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: peerd <command> [flags]\n\ncommands:\n")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-20s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(os.Stderr, "\nRun 'peerd <command> --help' for a command's flags. Every flag can also be set\nwith the environment variable PEERD_<FLAG> (upper case, dashes as underscores).\n")
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	name := os.Args[1]
	if name == "-h" || name == "--help" || name == "help" {
		usage()
		return
	}
	if name == "--version" {
		name = "version"
	}
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "peerd: unknown command %q\n\n", name)
		usage()
		os.Exit(2)
	}
	if err := cmd.run(os.Args[2:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintf(os.Stderr, "peerd %s: %v\n", name, err)
		os.Exit(1)
	}
}
