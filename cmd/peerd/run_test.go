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
