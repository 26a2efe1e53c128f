package main

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// containerd-config refuses a registry entry that is not host[:port] (from
// the flag or the environment) with the entry and what is expected, and
// writes nothing.
func TestContainerdConfigRefusesBadRegistry(t *testing.T) {
	for _, c := range []struct {
		env  string
		args []string
	}{
		{"", []string{"--registries", "::"}},
		{"", []string{"--registries", "docker.io,::"}},
		{"", []string{"--registries", "docker.io", "--registries", "2001:db8::1:5000"}},
		{"::", nil},
		{"ghcr.io,[::1", nil},
	} {
		t.Run("", func(t *testing.T) {
			dir := t.TempDir()
			if c.env != "" {
				t.Setenv("PEERD_REGISTRIES", c.env)
			}
			err := containerdConfigCmd(append([]string{"--hosts-dir", dir}, c.args...))
			if err == nil || !strings.Contains(err.Error(), "want host[:port]") {
				t.Errorf("env %q args %q: %v", c.env, c.args, err)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("env %q args %q wrote %v", c.env, c.args, ents)
			}
		})
	}
	// The same command with good entries writes, so the refusals above are
	// about the entries.
	dir := t.TempDir()
	if err := containerdConfigCmd([]string{"--hosts-dir", dir, "--registries", "docker.io,[::1]:5000"}); err != nil {
		t.Fatal(err)
	}
	for _, reg := range []string{"docker.io", "[::1]:5000"} {
		if _, err := os.Stat(filepath.Join(dir, reg, "hosts.toml")); err != nil {
			t.Error(err)
		}
	}
}

// run refuses a bad --registries entry (flag or environment) while it
// parses its flags, before it creates the data folder or starts a part.
func TestRunRefusesBadRegistry(t *testing.T) {
	for _, c := range []struct {
		env  string
		args []string
	}{
		{"", []string{"--registries", "::"}},
		{"", []string{"--registries", "docker.io", "--registries", "ghcr.io,fd00::1"}},
		{"docker.io,::", nil},
	} {
		t.Run("", func(t *testing.T) {
			if c.env != "" {
				t.Setenv("PEERD_REGISTRIES", c.env)
			}
			data := filepath.Join(t.TempDir(), "data")
			// A bad --log-format stops run right after its flag checks, so
			// an entry that got through them still starts nothing.
			err := runCmd(append([]string{"--data-dir", data, "--log-format", "bogus"}, c.args...))
			if err == nil || !strings.Contains(err.Error(), "want host[:port]") {
				t.Errorf("env %q args %q: %v", c.env, c.args, err)
			}
			if _, err := os.Stat(data); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("env %q args %q: data folder: %v", c.env, c.args, err)
			}
		})
	}
}
