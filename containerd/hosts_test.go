package containerd

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const mirror = "http://127.0.0.1:30000"

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestWriteHostsFresh(t *testing.T) {
	dir := t.TempDir()
	changed, err := WriteHosts(HostsConfig{Dir: dir, Registries: []string{"docker.io", "ghcr.io", "http://127.0.0.1:5000", "_default"}, Mirror: mirror + "/"})
	if err != nil {
		t.Fatal(err)
	}
	if len(changed) != 4 {
		t.Fatalf("changed %v", changed)
	}
	want := map[string]string{
		"docker.io": `# BEGIN peerd mirror (written by 'peerd containerd-config'; undo with --remove)
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:30000"]
  capabilities = ["pull", "resolve"]
  dial_timeout = "200ms"
# END peerd mirror
`,
		"ghcr.io":        `server = "https://ghcr.io"`,
		"127.0.0.1:5000": `server = "http://127.0.0.1:5000"`,
	}
	for reg, w := range want {
		got := readFile(t, HostsPath(dir, reg))
		if !strings.Contains(got, w) {
			t.Errorf("%s/hosts.toml =\n%s\nwant it to contain\n%s", reg, got, w)
		}
	}
	if got := readFile(t, HostsPath(dir, "_default")); strings.Contains(got, "server") || !strings.Contains(got, `[host."http://127.0.0.1:30000"]`) {
		t.Errorf("_default/hosts.toml =\n%s", got)
	}
	for _, reg := range []string{"docker.io", "ghcr.io", "127.0.0.1:5000", "_default"} {
		if ok, err := MirrorConfigured(HostsPath(dir, reg), mirror); !ok || err != nil {
			t.Errorf("%s: mirror not first host (%v)", reg, err)
		}
	}
	// Nothing to back up: the files are peerd's.
	if _, err := os.Stat(HostsPath(dir, "docker.io") + BackupSuffix); err == nil {
		t.Error("backed up a file that did not exist")
	}
	// Idempotent.
	again, err := WriteHosts(HostsConfig{Dir: dir, Registries: []string{"docker.io", "ghcr.io", "http://127.0.0.1:5000", "_default"}, Mirror: mirror})
	if err != nil || len(again) != 0 {
		t.Fatalf("second write changed %v (%v)", again, err)
	}
	// Remove deletes what peerd created.
	removed, err := RemoveHosts(dir, []string{"docker.io", "ghcr.io", "http://127.0.0.1:5000", "_default"})
	if err != nil || len(removed) != 4 {
		t.Fatalf("remove: %v %v", removed, err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("left behind %v", ents)
	}
}

const existing = `# the team's registry settings
server = "https://registry.corp.example"
ca = "/etc/certs/corp-ca.pem"
capabilities = [
  "pull",
  "resolve",
  "push",
]

[host."https://cache.corp.example"]
  capabilities = ["pull"] # [not a table]
  ca = "/etc/certs/cache.pem"
  [host."https://cache.corp.example".header]
    x-team = ["infra"]
`

func TestWriteHostsKeepsExistingFile(t *testing.T) {
	dir := t.TempDir()
	path := HostsPath(dir, "registry.corp.example")
	os.MkdirAll(filepath.Dir(path), 0o755)
	if err := os.WriteFile(path, []byte(existing), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := HostsConfig{Dir: dir, Registries: []string{"registry.corp.example"}, Mirror: mirror}
	if _, err := WriteHosts(cfg); err != nil {
		t.Fatal(err)
	}
	got := readFile(t, path)
	// Top-level keys first, then peerd's host (tried first), then the team's host.
	iServer := strings.Index(got, `server = "https://registry.corp.example"`)
	iPush := strings.Index(got, `"push",`)
	iMirror := strings.Index(got, `[host."http://127.0.0.1:30000"]`)
	iCache := strings.Index(got, `[host."https://cache.corp.example"]`)
	if iServer < 0 || iPush < 0 || iMirror < 0 || iCache < 0 || !(iServer < iPush && iPush < iMirror && iMirror < iCache) {
		t.Fatalf("layout wrong:\n%s", got)
	}
	if strings.Count(got, "server =") != 1 {
		t.Fatalf("server written twice:\n%s", got)
	}
	for _, keep := range []string{`ca = "/etc/certs/corp-ca.pem"`, `ca = "/etc/certs/cache.pem"`, `x-team = ["infra"]`} {
		if !strings.Contains(got, keep) {
			t.Fatalf("lost %q:\n%s", keep, got)
		}
	}
	if b := readFile(t, path+BackupSuffix); b != existing {
		t.Fatalf("backup differs:\n%s", b)
	}
	// A later run with another mirror keeps the first backup and replaces the block.
	cfg.Mirror = "http://127.0.0.1:30001"
	if _, err := WriteHosts(cfg); err != nil {
		t.Fatal(err)
	}
	got = readFile(t, path)
	if strings.Contains(got, "30000") || strings.Count(got, "# BEGIN peerd") != 1 || !strings.Contains(got, `[host."http://127.0.0.1:30001"]`) {
		t.Fatalf("rewrite:\n%s", got)
	}
	if b := readFile(t, path+BackupSuffix); b != existing {
		t.Fatal("backup overwritten")
	}
	if _, err := RemoveHosts(dir, []string{"registry.corp.example"}); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, path); got != existing {
		t.Fatalf("remove did not restore the original:\n%s", got)
	}
	if _, err := os.Stat(path + BackupSuffix); !os.IsNotExist(err) {
		t.Fatal("backup left behind")
	}
	// Removing again touches nothing.
	if ch, err := RemoveHosts(dir, []string{"registry.corp.example"}); err != nil || len(ch) != 0 {
		t.Fatalf("second remove: %v %v", ch, err)
	}
}

// Registry entries are host[:port] as in an image reference; anything else
// is refused with the entry and what is expected, before any file changes.
func TestParseRegistry(t *testing.T) {
	for in, want := range map[string]Registry{
		"docker.io":              {"docker.io", "https://registry-1.docker.io"},
		"ghcr.io:443":            {"ghcr.io:443", "https://ghcr.io:443"},
		"http://127.0.0.1:5000":  {"127.0.0.1:5000", "http://127.0.0.1:5000"},
		"Registry.Example:65535": {"registry.example:65535", "https://registry.example:65535"},
		"[::1]:5000":             {"[::1]:5000", "https://[::1]:5000"},
		"http://[fd00::1]":       {"[fd00::1]", "http://[fd00::1]"},
		"localhost/":             {"localhost", "https://localhost"},
		"_default":               {"_default", ""},
	} {
		if got, err := ParseRegistry(in); err != nil || got != want {
			t.Errorf("ParseRegistry(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{
		"", "::", "::1", "fd00::1:5000", "[::1", "[::1]x", "[1.2.3.4]", "[fe80::1%eth0]:5000",
		"x.io:0", "x.io:65536", "x.io:", "x.io:+5", "x.io:050", "1.2.3.256", "5000",
		"a_b.io", "-a.io", "a-.io", ".", "..", "x..y", "a/b", "user@x.io", "ftp://x.io", "http://",
	} {
		_, err := ParseRegistry(in)
		if err == nil {
			t.Errorf("ParseRegistry(%q) accepted", in)
		} else if msg := err.Error(); !strings.Contains(msg, fmt.Sprintf("%q", in)) || !strings.Contains(msg, "want host[:port]") {
			t.Errorf("ParseRegistry(%q): %q names neither the entry nor what is expected", in, msg)
		}
	}
}

// A bad entry among good ones refuses the whole call: no file is written
// or removed for the good ones.
func TestHostsRefuseBadRegistryFirst(t *testing.T) {
	dir := t.TempDir()
	if _, err := WriteHosts(HostsConfig{Dir: dir, Registries: []string{"docker.io", "::"}, Mirror: mirror}); err == nil || !strings.Contains(err.Error(), `"::"`) {
		t.Fatalf("write with \"::\": %v", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("a refused write left %v", ents)
	}
	if _, err := WriteHosts(HostsConfig{Dir: dir, Registries: []string{"docker.io"}, Mirror: mirror}); err != nil {
		t.Fatal(err)
	}
	path := HostsPath(dir, "docker.io")
	before := readFile(t, path)
	if changed, err := RemoveHosts(dir, []string{"docker.io", "::"}); err == nil || len(changed) != 0 {
		t.Fatalf("remove with \"::\": changed %v, %v", changed, err)
	}
	if after := readFile(t, path); after != before {
		t.Fatalf("a refused remove changed %s to %q", path, after)
	}
}

func TestWriteHostsRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []HostsConfig{
		{Dir: dir, Registries: []string{"docker.io"}, Mirror: "127.0.0.1:30000"},
		{Dir: dir, Registries: []string{"docker.io"}, Mirror: "http://127.0.0.1:30000/v2"},
		{Dir: dir, Registries: []string{"docker.io"}, Mirror: "ftp://x"},
		{Dir: dir, Registries: []string{"../etc"}, Mirror: mirror},
		{Dir: dir, Registries: []string{"a/b"}, Mirror: mirror},
		{Dir: dir, Registries: []string{".."}, Mirror: mirror},
		{Dir: dir, Registries: []string{"x..y"}, Mirror: mirror},
		{Dir: dir, Registries: []string{"ftp://x.io"}, Mirror: mirror},
		{Dir: dir, Registries: []string{"x.io:99999"}, Mirror: mirror},
		{Dir: dir, Registries: []string{"::"}, Mirror: mirror},
		{Dir: dir, Registries: []string{"::1"}, Mirror: mirror},
		{Dir: dir, Registries: nil, Mirror: mirror},
		{Dir: "", Registries: []string{"docker.io"}, Mirror: mirror},
	} {
		if _, err := WriteHosts(c); err == nil {
			t.Errorf("accepted %+v", c)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("bad input wrote %v", ents)
	}
}

func TestRegistryConfigPathsAndCheckMirror(t *testing.T) {
	dir := t.TempDir()
	v2 := filepath.Join(dir, "v2.toml")
	os.WriteFile(v2, []byte(`version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d" # where hosts.toml live
`), 0o644)
	v3 := filepath.Join(dir, "v3.toml")
	os.WriteFile(v3, []byte(`version = 3
[plugins]
  [plugins.'io.containerd.cri.v1.images']
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = '/a:/b'
  [plugins.'io.containerd.transfer.v1.local']
    config_path = '/not/cri'
`), 0o644)
	empty := filepath.Join(dir, "empty.toml")
	os.WriteFile(empty, []byte("version = 2\n"), 0o644)
	for _, c := range []struct {
		file  string
		major int
		want  string
	}{
		{v2, 1, "[/etc/containerd/certs.d]"},
		{v3, 2, "[/a /b]"},
		{empty, 1, "[]"},
		{empty, 2, "[/etc/containerd/certs.d /etc/docker/certs.d]"},
		{filepath.Join(dir, "missing.toml"), 2, "[/etc/containerd/certs.d /etc/docker/certs.d]"},
	} {
		got, err := RegistryConfigPaths(c.file, c.major)
		if err != nil || strings.Join(strings.Fields(strings.Trim(c.want, "[]")), " ") != strings.Join(got, " ") {
			t.Errorf("%s (%d.x) = %v, %v; want %s", filepath.Base(c.file), c.major, got, err, c.want)
		}
	}

	hosts := filepath.Join(dir, "certs.d")
	cfg := filepath.Join(dir, "config.toml")
	os.WriteFile(cfg, []byte("[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \""+hosts+"\"\n"), 0o644)
	if err := CheckMirror(cfg, 1, hosts, []string{"docker.io"}, mirror); err == nil || !strings.Contains(err.Error(), "docker.io/hosts.toml") {
		t.Fatalf("no hosts.toml yet: %v", err)
	}
	if _, err := WriteHosts(HostsConfig{Dir: hosts, Registries: []string{"docker.io"}, Mirror: mirror}); err != nil {
		t.Fatal(err)
	}
	if err := CheckMirror(cfg, 1, hosts, []string{"docker.io"}, mirror); err != nil {
		t.Fatalf("configured: %v", err)
	}
	if err := CheckMirror(empty, 1, hosts, []string{"docker.io"}, mirror); err == nil || !strings.Contains(err.Error(), "never reads hosts.toml") {
		t.Fatalf("1.x without config_path: %v", err)
	}
	if err := CheckMirror(cfg, 1, hosts, []string{"docker.io"}, "http://127.0.0.1:1"); err == nil {
		t.Fatal("another mirror passed the check")
	}
}

func TestWriteHostsAfterUserReplacedFile(t *testing.T) {
	dir := t.TempDir()
	path := HostsPath(dir, "ghcr.io")
	cfg := HostsConfig{Dir: dir, Registries: []string{"ghcr.io"}, Mirror: mirror}
	if _, err := WriteHosts(cfg); err != nil {
		t.Fatal(err)
	}
	// Configuration management replaces the file with its own.
	theirs := "server = \"https://ghcr.io\"\n\n[host.\"https://ghcr-cache.corp.example\"]\n  capabilities = [\"pull\"]\n"
	if err := os.WriteFile(path, []byte(theirs), 0o644); err != nil {
		t.Fatal(err)
	}
	if ok, _ := MirrorConfigured(path, mirror); ok {
		t.Fatal("mirror reported configured in a file without it")
	}
	if _, err := WriteHosts(cfg); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, path); !strings.Contains(got, "ghcr-cache.corp.example") || strings.Index(got, "127.0.0.1:30000") > strings.Index(got, "ghcr-cache") {
		t.Fatalf("rewrite lost their host or put it first:\n%s", got)
	}
	if _, err := RemoveHosts(dir, []string{"ghcr.io"}); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, path); got != theirs {
		t.Fatalf("remove did not restore their latest file:\n%s", got)
	}
	// A file peerd never touched is left alone by --remove.
	if ch, err := RemoveHosts(dir, []string{"ghcr.io"}); err != nil || len(ch) != 0 || readFile(t, path) != theirs {
		t.Fatalf("remove touched a foreign file: %v %v", ch, err)
	}
}
