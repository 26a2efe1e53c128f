package main

import (
	"flag"
	"io"
	"strings"
	"testing"
)

// Each out-of-range p2p flag is refused with its name; the defaults pass.
func TestP2PFlagsValidate(t *testing.T) {
	parse := func(args ...string) *p2pConfig {
		t.Helper()
		var c p2pConfig
		fs := flag.NewFlagSet("run", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		registerP2PFlags(fs, &c)
		if err := fs.Parse(args); err != nil {
			t.Fatalf("parse %v: %v", args, err)
		}
		return &c
	}
	if err := parse().validate(); err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	if err := parse("--peer-upload-rate=20MiB", "--peer-upload-streams=4").validate(); err != nil {
		t.Fatalf("an upload cap refused: %v", err)
	}
	for _, bad := range []string{"--peer-upload-rate=fast", "--peer-upload-rate=-5MiB", "--peer-upload-streams=many"} {
		var c p2pConfig
		fs := flag.NewFlagSet("run", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		registerP2PFlags(fs, &c)
		if err := fs.Parse([]string{bad}); err == nil && c.validate() == nil {
			t.Errorf("%s accepted", bad)
		}
	}
	if err := parse("--miss-hedge=2s", "--resolve-timeout=2s").validate(); err != nil {
		t.Fatalf("--miss-hedge=2s refused: %v", err)
	}
	for _, bad := range [][]string{
		{"--miss-hedge=0s"},
		{"--miss-hedge=-1ms"},
		{"--miss-hedge=2m"},
		{"--resolve-timeout=0s"},
		{"--swarm-gather=6s"},
		{"--swarm-wait=10s"},
		{"--reprovide-interval=30s"},
		{"--resolve-retries=11"},
		{"--peer-upload-streams=0"},
		{"--peer-upload-streams=-3"},
		{"--peer-upload-streams=5000"},
		{"--peer-upload-rate=1KiB"},
	} {
		err := parse(bad...).validate()
		name := strings.SplitN(bad[0], "=", 2)[0]
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%v: error %v, want one naming %s", bad, err, name)
		}
	}
}
