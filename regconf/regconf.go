// Package regconf writes the containers-registries.conf drop-in that makes
// CRI-O, Podman and every other containers/image client try peerd first as
// a mirror of each registry (so a miss falls through to the registry).
package regconf

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"

	ctrd "github.com/peerd-project/peerd/containerd"
	"github.com/peerd-project/peerd/httpmirror"
	"github.com/peerd-project/peerd/internal/atomicfile"
	"github.com/pelletier/go-toml/v2"
)

// FileName is peerd's drop-in: drop-ins load in alphanumeric order and a
// later [[registry]] with the same prefix replaces an earlier one, so it
// sorts last.
const FileName = "zz-peerd.conf"

const header = "# Written by 'peerd registries-config': peerd's mirror first for each registry below.\n# Undo with 'peerd registries-config --remove'. Edits here are overwritten.\n"

// Config says what to write.
type Config struct {
	// Dir is the drop-in folder (/etc/containers/registries.conf.d); the
	// main file is registries.conf beside it.
	Dir string
	// Registries as for containerd-config: host[:port], http:// for plain HTTP.
	Registries []string
	// Mirror is peerd's HTTP address as the clients reach it, e.g.
	// http://127.0.0.1:30000.
	Mirror string
}

type registryTable struct {
	Prefix   string        `toml:"prefix,omitempty"`
	Location string        `toml:"location,omitempty"`
	Insecure bool          `toml:"insecure,omitempty"`
	Blocked  bool          `toml:"blocked,omitempty"`
	Mirror   []mirrorTable `toml:"mirror,omitempty"`
}

type mirrorTable struct {
	Location string `toml:"location"`
	Insecure bool   `toml:"insecure,omitempty"`
}

type confFile struct {
	Registry []registryTable `toml:"registry"`
}

// Write writes (or rewrites) the drop-in; it reports whether the file
// changed. Settings the operator gave a registry elsewhere (its location,
// insecure, blocked) are carried into peerd's table, which replaces theirs;
// a registry that already has mirrors elsewhere is refused, as is any file
// that does not parse: nothing is written then.
func Write(c Config) (bool, error) {
	mu, err := url.Parse(c.Mirror)
	if err != nil || (mu.Scheme != "http" && mu.Scheme != "https") || mu.Host == "" || (mu.Path != "" && mu.Path != "/") {
		return false, fmt.Errorf("--mirror %q: want http(s)://host:port", c.Mirror)
	}
	if len(c.Registries) == 0 {
		return false, errors.New("--registries: name at least one registry")
	}
	existing, err := readOthers(c.Dir)
	if err != nil {
		return false, err
	}
	var out confFile
	seen := map[string]bool{}
	for _, entry := range c.Registries {
		reg, err := ctrd.ParseRegistry(entry)
		if err != nil {
			return false, err
		}
		if reg.Host == "_default" {
			return false, errors.New("registries.conf has no catch-all mirror: list the registries (_default is for containerd-config only)")
		}
		if seen[reg.Host] {
			continue
		}
		seen[reg.Host] = true
		t := registryTable{Prefix: reg.Host, Location: reg.Host, Insecure: strings.HasPrefix(reg.Server, "http://")}
		if old, file, ok := existing.find(reg.Host); ok {
			if len(old.Mirror) > 0 {
				return false, fmt.Errorf("%s already gives registry %s mirrors (%s): add peerd's mirror (%s) to that table by hand", file, reg.Host, old.Mirror[0].Location, mirrorLocation(mu, reg.Host))
			}
			if old.Location != "" {
				t.Location = old.Location
			}
			t.Insecure = t.Insecure || old.Insecure
			t.Blocked = old.Blocked
		}
		t.Mirror = []mirrorTable{{Location: mirrorLocation(mu, reg.Host), Insecure: mu.Scheme == "http"}}
		out.Registry = append(out.Registry, t)
	}
	body, err := toml.Marshal(out)
	if err != nil {
		return false, err
	}
	next := append([]byte(header), body...)
	path := filepath.Join(c.Dir, FileName)
	old, err := os.ReadFile(path)
	switch {
	case err == nil && !bytes.HasPrefix(old, []byte(header[:40])):
		return false, fmt.Errorf("%s exists and was not written by peerd: rename it or merge by hand", path)
	case err == nil && bytes.Equal(old, next):
		return false, nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return false, err
	}
	// Atomic: a crash or a full disk leaves the old drop-in or the new one.
	return true, atomicfile.Write(path, next, 0o644)
}

// Remove deletes peerd's drop-in; it reports whether there was one.
func Remove(dir string) (bool, error) {
	path := filepath.Join(dir, FileName)
	old, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if !bytes.HasPrefix(old, []byte(header[:40])) {
		return false, fmt.Errorf("%s was not written by peerd: left alone", path)
	}
	return true, os.Remove(path)
}

// mirrorLocation is peerd's mirror of registry as a registries.conf
// location, no scheme: host:port/peerd/<registry as a path component>.
func mirrorLocation(mirror *url.URL, registry string) string {
	return mirror.Host + "/" + httpmirror.MirrorPathPrefix + "/" + httpmirror.MirrorPathName(registry)
}

type others struct {
	files  []string
	tables [][]registryTable
}

// readOthers parses the main registries.conf beside dir and every other
// drop-in in dir, in the order containers/image loads them.
func readOthers(dir string) (others, error) {
	var o others
	paths := []string{filepath.Join(filepath.Dir(filepath.Clean(dir)), "registries.conf")}
	des, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return o, err
	}
	var names []string
	for _, de := range des {
		if !de.IsDir() && strings.HasSuffix(de.Name(), ".conf") && de.Name() != FileName {
			names = append(names, de.Name())
		}
	}
	slices.Sort(names)
	for _, n := range names {
		paths = append(paths, filepath.Join(dir, n))
	}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return o, err
		}
		var f confFile
		if err := toml.Unmarshal(b, &f); err != nil {
			return o, fmt.Errorf("%s does not parse (%v): fix it first; nothing was written", p, err)
		}
		o.files = append(o.files, p)
		o.tables = append(o.tables, f.Registry)
	}
	return o, nil
}

// find returns the last table for prefix host (a later file wins).
func (o others) find(host string) (registryTable, string, bool) {
	for i := len(o.files) - 1; i >= 0; i-- {
		for _, t := range slices.Backward(o.tables[i]) {
			p := t.Prefix
			if p == "" {
				p = t.Location
			}
			if p == host {
				return t, o.files[i], true
			}
		}
	}
	return registryTable{}, "", false
}
