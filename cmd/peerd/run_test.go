package main

import (
	"flag"
	"io"
	"strings"
	"testing"
)

// Bad core flags are refused with their name; the defaults pass.
func TestCoreFlagsValidate(t *testing.T) {
	parse := func(args ...string) (*runConfig, error) {
		t.Helper()
		var c runConfig
		fs := flag.NewFlagSet("run", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		registerCoreFlags(fs, &c)
		return &c, fs.Parse(args)
	}
	c, err := parse()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.validate(); err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	// Sizes the flag parser itself refuses.
	for _, v := range []string{"nan", "NaN", "-1", "lots", "inf"} {
		if _, err := parse("--cache-size=" + v); err == nil {
			t.Errorf("--cache-size=%s accepted", v)
		}
	}
	for _, bad := range []string{"--shutdown-timeout=-5s", "--shutdown-timeout=0s", "--shutdown-timeout=1h", "--chunk-size=1KiB", "--cache-size=1KiB", "--prefetch-workers=0"} {
		c, err := parse(bad)
		if err != nil {
			t.Fatalf("%s: %v", bad, err)
		}
		name := strings.SplitN(bad, "=", 2)[0]
		if err := c.validate(); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: error %v, want one naming %s", bad, err, name)
		}
	}
}

// --warm's references must parse and name a registry of --registries.
func TestWarmFlagsValidate(t *testing.T) {
	for args, want := range map[string]string{
		"--warm=ghcr.io/m:v1":                                                                    "needs --registries",
		"--registries=ghcr.io --warm=ghcr.io/m":                                                  "name a tag",
		"--registries=ghcr.io --warm=quay.io/m:v1":                                               "not in --registries",
		"--registries=ghcr.io --warm=ghcr.io/M:v1":                                               "not a repository name",
		"--registries=http://10.0.0.5:5000 --warm=10.0.0.5:5000/a/m:v1":                          "",
		"--registries=ghcr.io --warm=ghcr.io/a/m:v1,ghcr.io/b@sha256:" + strings.Repeat("0", 64): "",
	} {
		var c runConfig
		fs := flag.NewFlagSet("run", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		registerCoreFlags(fs, &c)
		registerFUSEFlags(fs, &c.FUSE)
		registerContainerdFlags(fs, &c.Containerd)
		registerWarmFlags(fs, &c.Warm)
		if err := fs.Parse(strings.Fields(args)); err != nil {
			t.Fatalf("%s: %v", args, err)
		}
		err := c.Warm.validate(c.Containerd.pullThroughServers())
		if (want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), want)) {
			t.Errorf("%s: %v, want %q", args, err, want)
		}
	}
}
