package containerd

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/log"
	"github.com/pelletier/go-toml/v2"

	"github.com/peerd-project/peerd/internal/reliability"
)

func parsesAsTOML(b []byte) bool {
	var m map[string]any
	return toml.Unmarshal(b, &m) == nil
}

// readByContainerd reports whether containerd took every host of a
// hosts.toml (it falls back to the default host, silently but for a log
// line, when it cannot).
func readByContainerd(b []byte, hosts []docker.RegistryHost, err error) bool {
	var c struct {
		Host map[string]any `toml:"host"`
	}
	return err == nil && toml.Unmarshal(b, &c) == nil && len(hosts) == len(c.Host)+1
}

// containerdHosts is the host list containerd itself reads from dir's
// hosts.toml, in the order it tries them.
func containerdHosts(dir, registry string) ([]docker.RegistryHost, error) {
	return config.ConfigureHosts(context.Background(), config.HostOptions{
		HostDir: func(string) (string, error) { return dir, nil },
	})(registry)
}

type hostView struct {
	Scheme, Host, Path string
	Caps               docker.HostCapabilities
}

func viewOf(hs []docker.RegistryHost) []hostView {
	var out []hostView
	for _, h := range hs {
		out = append(out, hostView{h.Scheme, h.Host, h.Path, h.Capabilities})
	}
	return out
}

// FuzzHostsMerge writes peerd's block into an operator's hosts.toml. When
// containerd reads the operator's file, it must read the merged one too,
// with peerd's mirror first and the operator's hosts after it in their
// order (and their own server last when they set one); a second write
// changes nothing; --remove gives back the operator's bytes. Whatever the
// registry, its folder stays inside the hosts folder.
func FuzzHostsMerge(f *testing.F) {
	for _, s := range [][2]string{
		{"", "docker.io"},
		{"server = \"https://registry.example.com\"\n\n[host.\"https://cache.example.com\"]\n  capabilities = [\"pull\"]\n", "registry.example.com"},
		{"server = \"https://r.example.com\"\n[host.\"https://a.example.com\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"/etc/ca.pem\"\n[host.\"https://b.example.com\"]\n  skip_verify = true\n", "r.example.com"},
		{"# comment\nserver = 'https://x.io' # trailing\n", "http://x.io:5000"},
		{"capabilities = [\n  \"pull\",\n  \"resolve\",\n]\n[host.\"https://m\"]\n", "ghcr.io"},
		{"[host.\"https://a\"]\n[host.\"https://a\".header]\n  x-custom = [\"1\"]\n", "_default"},
		{"server = \"https://x\"\n" + blockBegin + "\nserver = \"stale\"\n" + blockEnd + "\n", "x"},
		{"server = \"https://x\"", "127.0.0.1:5000"},
		{"", "../etc"}, {"", "[::1]:5000"}, {"", "a/b"}, {"", "."},
	} {
		f.Add(s[0], s[1])
	}
	log.L.Logger.SetOutput(io.Discard) // containerd logs every file it cannot decode
	root := f.TempDir()
	var seq atomic.Int64
	const mirror = "http://127.0.0.1:30000"
	var replayed atomic.Int64
	reliability.RecordFuzz(f, &replayed, "FuzzHostsMerge", "found valid operator files (inline host table, multi-line string) whose merge containerd would not read; the write is now refused and the file left alone")
	f.Fuzz(func(t *testing.T, existing, registry string) {
		replayed.Add(1)
		reg, err := ParseRegistry(registry)
		if err != nil {
			return
		}
		if reg.Host == "" || reg.Host == "." || reg.Host == ".." || strings.ContainsAny(reg.Host, "/\\\x00") {
			t.Fatalf("ParseRegistry(%q) gives folder %q", registry, reg.Host)
		}
		dir := filepath.Join(root, fmt.Sprint(seq.Add(1)))
		defer os.RemoveAll(dir)
		path := HostsPath(dir, reg.Host)
		if filepath.Dir(filepath.Dir(path)) != dir {
			t.Fatalf("registry %q writes %s, outside %s", registry, path, dir)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(existing), 0o644); err != nil {
			t.Fatal(err)
		}
		before, beforeErr := containerdHosts(filepath.Dir(path), reg.Host)

		cfg := HostsConfig{Dir: dir, Registries: []string{registry}, Mirror: mirror}
		if _, err := WriteHosts(cfg); err != nil {
			if b, _ := os.ReadFile(path); !bytes.Equal(b, []byte(existing)) {
				t.Fatalf("a refused write changed the file to %q", b)
			}
			return
		}
		merged, _ := os.ReadFile(path)
		if parsesAsTOML([]byte(existing)) && !parsesAsTOML(merged) {
			t.Fatalf("the operator's file is TOML, the merged one is not:\n%s", merged)
		}
		if readByContainerd([]byte(existing), before, beforeErr) && !strings.Contains(existing, blockBegin) {
			after, err := containerdHosts(filepath.Dir(path), reg.Host)
			if err != nil {
				t.Fatalf("containerd read the operator's file but not the merged one: %v\n%s", err, merged)
			}
			got, was := viewOf(after), viewOf(before)
			if len(got) != len(was)+1 || got[0].Scheme+"://"+got[0].Host != mirror ||
				got[0].Caps != docker.HostCapabilityPull|docker.HostCapabilityResolve {
				t.Fatalf("merged hosts %+v, operator's %+v\n%s", got, was, merged)
			}
			// The operator's hosts follow in their order; the server
			// (last) is theirs when they set one, else peerd's.
			if !slices.Equal(got[1:len(got)-1], was[:len(was)-1]) {
				t.Fatalf("operator's hosts %+v became %+v\n%s", was, got[1:], merged)
			}
			if ok, err := MirrorConfigured(path, mirror); !ok || err != nil {
				t.Fatalf("mirror not first host (%v)\n%s", err, merged)
			}
		}
		if changed, err := WriteHosts(cfg); err != nil || len(changed) != 0 {
			t.Fatalf("second write: %v %v\n%s", changed, err, merged)
		}
		if _, err := RemoveHosts(dir, []string{registry}); err != nil {
			t.Fatalf("remove: %v", err)
		}
		back, err := os.ReadFile(path)
		if !strings.Contains(existing, blockBegin) && (err != nil || !bytes.Equal(back, []byte(existing))) {
			t.Fatalf("remove gave back %q (%v), want the operator's %q", back, err, existing)
		}
	})
}
