package main

import (
	"flag"
	"os"
	"strings"

	"github.com/peerd-project/peerd/web"
)

// effectiveSettings lists every flag's value after the environment and the
// command line, and where it came from. parse applies PEERD_<FLAG> first,
// so a flag set by both shows as "flag".
func effectiveSettings(fs *flag.FlagSet) []web.Setting {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var out []web.Setting
	fs.VisitAll(func(f *flag.Flag) {
		src := "default"
		if set[f.Name] {
			src = "flag"
			if _, ok := os.LookupEnv(envName(f.Name)); ok && !onCommandLine(f.Name) {
				src = "env"
			}
		}
		out = append(out, web.Setting{Flag: f.Name, Value: f.Value.String(), Source: src})
	})
	return out
}

// envName is the environment variable parse reads for a flag.
func envName(flag string) string {
	return "PEERD_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// onCommandLine reports whether the process's arguments name the flag.
func onCommandLine(name string) bool {
	for _, a := range os.Args[1:] {
		a = strings.TrimLeft(a, "-")
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}
