package main

import (
	"flag"
	"io"
	"testing"
	"time"
)

func TestMajorVersion(t *testing.T) {
	for v, want := range map[string]int{"v2.4.2": 2, "1.6.20~ds1": 1, "2.0.0-rc.1": 2, "": 0, "dev": 0} {
		if got := majorVersion(v); got != want {
			t.Errorf("majorVersion(%q) = %d, want %d", v, got, want)
		}
	}
}

func TestMirrorHostPort(t *testing.T) {
	for addr, want := range map[string]string{
		"127.0.0.1:30000": "127.0.0.1:30000",
		"0.0.0.0:30000":   "127.0.0.1:30000",
		":30000":          "127.0.0.1:30000",
		"[::]:30000":      "127.0.0.1:30000",
		"10.1.2.3:5000":   "10.1.2.3:5000",
	} {
		if got := mirrorHostPort(addr); got != want {
			t.Errorf("mirrorHostPort(%q) = %q, want %q", addr, got, want)
		}
	}
}

func TestContainerdFlags(t *testing.T) {
	parseCfg := func(args ...string) (*containerdConfig, error) {
		c := &containerdConfig{}
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		registerContainerdFlags(fs, c)
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		return c, c.validate()
	}
	c, err := parseCfg()
	if err != nil || c.Socket != "/run/containerd/containerd.sock" || c.Namespace != "k8s.io" || c.ResolveTags || c.Resync != time.Minute {
		t.Fatalf("defaults: %+v %v", c, err)
	}
	c, err = parseCfg("--registries", "docker.io,http://127.0.0.1:5000", "--registries", "index.docker.io")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.registryHosts(); len(got) != 3 || got[0] != "docker.io" || got[1] != "127.0.0.1:5000" || got[2] != "docker.io" {
		t.Fatalf("registry hosts %v", got)
	}
	for _, bad := range [][]string{
		{"--registries", "a/b"},
		{"--registries", "_default"},
		{"--registries", "::"},
		{"--registries", "docker.io,::1"},
		{"--containerd-namespace", ""},
		{"--containerd-resync", "10ms"},
	} {
		if _, err := parseCfg(bad...); err == nil {
			t.Errorf("accepted %v", bad)
		}
	}
}
