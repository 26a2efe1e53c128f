package regconf

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

func setup(t *testing.T, main string, dropins map[string]string) string {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, "registries.conf.d")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if main != "" {
		os.WriteFile(filepath.Join(root, "registries.conf"), []byte(main), 0o644)
	}
	for n, b := range dropins {
		os.WriteFile(filepath.Join(dir, n), []byte(b), 0o644)
	}
	return dir
}

func read(t *testing.T, dir string) confFile {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	var f confFile
	if err := toml.Unmarshal(b, &f); err != nil {
		t.Fatalf("peerd's drop-in does not parse: %v\n%s", err, b)
	}
	return f
}

func TestWriteMirrorsEachRegistryAndCarriesTheOperatorsSettings(t *testing.T) {
	dir := setup(t, `unqualified-search-registries = ["docker.io"]
[[registry]]
prefix = "ghcr.io"
location = "ghcr.example.internal"
blocked = false
`, map[string]string{"10-local.conf": "[[registry]]\nlocation = \"10.0.0.5:5000\"\ninsecure = true\n"})
	c := Config{Dir: dir, Registries: []string{"docker.io", "ghcr.io", "http://10.0.0.5:5000"}, Mirror: "http://127.0.0.1:30000"}
	changed, err := Write(c)
	if err != nil || !changed {
		t.Fatalf("Write: %v, changed %v", err, changed)
	}
	f := read(t, dir)
	if len(f.Registry) != 3 {
		t.Fatalf("%d registry tables, want 3: %+v", len(f.Registry), f.Registry)
	}
	want := map[string]struct{ location, mirror string }{
		"docker.io":     {"docker.io", "127.0.0.1:30000/peerd/docker.io"},
		"ghcr.io":       {"ghcr.example.internal", "127.0.0.1:30000/peerd/ghcr.io"},
		"10.0.0.5:5000": {"10.0.0.5:5000", "127.0.0.1:30000/peerd/10.0.0.5-5000"},
	}
	for _, r := range f.Registry {
		w, ok := want[r.Prefix]
		if !ok || r.Location != w.location || len(r.Mirror) != 1 || r.Mirror[0].Location != w.mirror || !r.Mirror[0].Insecure {
			t.Errorf("table %+v, want location %s and mirror %s (insecure: peerd is plain HTTP)", r, w.location, w.mirror)
		}
		if r.Prefix == "10.0.0.5:5000" && !r.Insecure {
			t.Error("the plain-HTTP registry lost insecure")
		}
	}
	// Idempotent.
	if changed, err := Write(c); err != nil || changed {
		t.Fatalf("second Write: %v, changed %v", err, changed)
	}
	// Remove restores the node: the operator's files are untouched.
	if ok, err := Remove(dir); err != nil || !ok {
		t.Fatalf("Remove: %v %v", ok, err)
	}
	if _, err := os.Stat(filepath.Join(dir, FileName)); !os.IsNotExist(err) {
		t.Fatal("drop-in still there")
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "10-local.conf")); !strings.Contains(string(b), "insecure = true") {
		t.Fatal("the operator's drop-in changed")
	}
}

func TestWriteRefusesAndWritesNothing(t *testing.T) {
	for name, tc := range map[string]struct {
		main       string
		dropins    map[string]string
		registries []string
		mirror     string
		want       string
	}{
		"conflicting mirrors": {dropins: map[string]string{"50-m.conf": "[[registry]]\nprefix = \"docker.io\"\n[[registry.mirror]]\nlocation = \"mirror.example/dockerhub\"\n"},
			registries: []string{"docker.io"}, want: "already gives registry docker.io mirrors"},
		"main file does not parse": {main: "[[registry]\nprefix=", registries: []string{"docker.io"}, want: "does not parse"},
		"registry with a path":     {registries: []string{"docker.io/library"}, want: "registry"},
		"_default":                 {registries: []string{"_default"}, want: "catch-all"},
		"mirror with a path":       {registries: []string{"docker.io"}, mirror: "http://127.0.0.1:30000/x", want: "--mirror"},
		"mirror not a URL":         {registries: []string{"docker.io"}, mirror: "127.0.0.1:30000", want: "--mirror"},
		"not peerd's file":         {dropins: map[string]string{FileName: "[[registry]]\nprefix = \"x\"\n"}, registries: []string{"docker.io"}, want: "not written by peerd"},
	} {
		t.Run(name, func(t *testing.T) {
			dir := setup(t, tc.main, tc.dropins)
			if tc.mirror == "" {
				tc.mirror = "http://127.0.0.1:30000"
			}
			before, _ := os.ReadFile(filepath.Join(dir, FileName))
			_, err := Write(Config{Dir: dir, Registries: tc.registries, Mirror: tc.mirror})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
			after, _ := os.ReadFile(filepath.Join(dir, FileName))
			if string(before) != string(after) {
				t.Fatal("a refused write changed peerd's drop-in")
			}
		})
	}
}

// A refused rewrite keeps the drop-in peerd wrote before, byte for byte, and
// leaves no temporary file: peerd writes no file but its own, so that file is
// the only state to keep.
func TestRefusedRewriteKeepsThePreviousDropIn(t *testing.T) {
	dir := setup(t, "", nil)
	if _, err := Write(Config{Dir: dir, Registries: []string{"docker.io"}, Mirror: "http://127.0.0.1:30000"}); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "50-m.conf"), []byte("[[registry]]\nprefix = \"ghcr.io\"\n[[registry.mirror]]\nlocation = \"m.example/ghcr\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, regs := range [][]string{{"docker.io/library"}, {"docker.io", "ghcr.io"}} {
		if _, err := Write(Config{Dir: dir, Registries: regs, Mirror: "http://127.0.0.1:30000"}); err == nil {
			t.Fatalf("registries %v: written", regs)
		}
		after, _ := os.ReadFile(filepath.Join(dir, FileName))
		if string(after) != string(before) {
			t.Fatalf("registries %v: a refused rewrite changed the drop-in:\n%s", regs, after)
		}
	}
	es, _ := os.ReadDir(dir)
	for _, e := range es {
		if e.Name() != FileName && e.Name() != "50-m.conf" {
			t.Fatalf("left behind: %s", e.Name())
		}
	}
}
