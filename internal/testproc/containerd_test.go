package testproc

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/peerd-project/peerd/containerd"
)

// ctrdConfig is the part of containerd's config the harnesses rely on.
type ctrdConfig struct {
	Version         int      `toml:"version"`
	Root            string   `toml:"root"`
	State           string   `toml:"state"`
	DisabledPlugins []string `toml:"disabled_plugins"`
	GRPC            struct {
		Address string `toml:"address"`
	} `toml:"grpc"`
	TTRPC struct {
		Address string `toml:"address"`
	} `toml:"ttrpc"`
	Plugins map[string]map[string]any `toml:"plugins"`
}

func TestContainerdRender(t *testing.T) {
	dir := t.TempDir()
	for _, v2 := range []bool{false, true} {
		c := Containerd{Dir: dir, Socket: filepath.Join(dir, "c.sock"), HostsDir: filepath.Join(dir, "hosts"), V2: v2, Snapshotter: "overlayfs"}
		text, err := c.Render()
		if err != nil {
			t.Fatal(err)
		}
		var got ctrdConfig
		if err := toml.Unmarshal([]byte(text), &got); err != nil {
			t.Fatalf("v2=%v: not TOML: %v\n%s", v2, err, text)
		}
		if got.Version != 2 || got.Root != filepath.Join(dir, "root") || got.State != filepath.Join(dir, "state") ||
			got.GRPC.Address != c.Socket || got.TTRPC.Address != c.Socket+".ttrpc" {
			t.Errorf("v2=%v: %+v", v2, got)
		}
		for _, p := range []string{"io.containerd.grpc.v1.cri", "io.containerd.nri.v1.nri"} {
			if !strings.Contains(strings.Join(got.DisabledPlugins, ","), p) {
				t.Errorf("v2=%v: %s not disabled: %v", v2, p, got.DisabledPlugins)
			}
		}
		if opt := got.Plugins["io.containerd.internal.v1.opt"]["path"]; opt != filepath.Join(dir, "opt") {
			t.Errorf("v2=%v: opt path %v", v2, opt)
		}
		transfer, ok := got.Plugins["io.containerd.transfer.v1.local"]
		if ok != v2 {
			t.Errorf("v2=%v: transfer section present=%v", v2, ok)
		}
		if v2 {
			unpack, _ := transfer["unpack_config"].([]any)
			if len(unpack) != 1 {
				t.Fatalf("unpack_config %v", transfer)
			}
			u := unpack[0].(map[string]any)
			if u["platform"] != "linux/"+runtime.GOARCH || u["snapshotter"] != "overlayfs" {
				t.Errorf("unpack_config %v", u)
			}
		}
		// peerd's start-up check must find the hosts folder in the file.
		file := filepath.Join(dir, "config.toml")
		if err := os.WriteFile(file, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		major := 1
		if v2 {
			major = 2
		}
		paths, err := containerd.RegistryConfigPaths(file, major)
		if err != nil || len(paths) != 1 || paths[0] != c.HostsDir {
			t.Errorf("v2=%v: peerd reads config_path %v (%v), want %s", v2, paths, err, c.HostsDir)
		}
	}
}

func TestContainerdRenderRejects(t *testing.T) {
	dir := t.TempDir()
	ok := Containerd{Dir: dir, Socket: filepath.Join(dir, "c.sock"), HostsDir: filepath.Join(dir, "hosts")}
	for _, c := range []struct {
		name, want string
		edit       func(*Containerd)
	}{
		{"relative dir", "Dir", func(c *Containerd) { c.Dir = "ctrd" }},
		{"no socket", "Socket", func(c *Containerd) { c.Socket = "" }},
		{"relative hosts", "HostsDir", func(c *Containerd) { c.HostsDir = "hosts" }},
		{"long socket", "unix socket", func(c *Containerd) { c.Socket = "/" + strings.Repeat("s", 102) }},
		{"2.x without snapshotter", "snapshotter", func(c *Containerd) { c.V2 = true }},
	} {
		cc := ok
		c.edit(&cc)
		if _, err := cc.Render(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error naming %s", c.name, err, c.want)
		}
	}
	// The longest socket that fits: its ttrpc path is 108 bytes.
	cc := ok
	cc.Socket = "/" + strings.Repeat("s", 101)
	if _, err := cc.Render(); err != nil {
		t.Errorf("a socket whose ttrpc path is 108 bytes: %v", err)
	}
}
