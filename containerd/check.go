package containerd

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// default2x is containerd 2.x's CRI registry config_path when its config
// sets none; containerd 1.x has no default and ignores hosts.toml files then.
const default2x = "/etc/containerd/certs.d:/etc/docker/certs.d"

var (
	tableRE      = regexp.MustCompile(`^\s*\[\s*([^\[\]]+?)\s*\]\s*$`)
	configPathRE = regexp.MustCompile(`^\s*((?:[A-Za-z0-9_."-]+\.)?)config_path\s*=\s*["']([^"']*)["']`)
)

// RegistryConfigPaths reads containerd's config.toml and returns the hosts
// folders its CRI plugin consults (registry config_path, split on ':').
// daemonMajor is containerd's major version (1 or 2), which decides the
// default when the file sets none or does not exist.
func RegistryConfigPaths(configFile string, daemonMajor int) ([]string, error) {
	b, err := os.ReadFile(configFile)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	table := ""
	var found string
	for _, line := range strings.Split(string(b), "\n") {
		line = stripComment(line)
		if m := tableRE.FindStringSubmatch(line); m != nil {
			table = strings.ReplaceAll(m[1], " ", "")
			continue
		}
		m := configPathRE.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		full := table + "." + m[1]
		// Only the CRI plugin's registry setting (the transfer service's own
		// config_path is used by clients that pass no hosts folder).
		if strings.Contains(full, "cri") && strings.Contains(full, "registry") {
			found = m[2]
		}
	}
	if found == "" && daemonMajor >= 2 {
		found = default2x
	}
	var out []string
	for _, p := range filepath.SplitList(found) {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, filepath.Clean(p))
		}
	}
	return out, nil
}

// CheckMirror reports why containerd would not consult the mirror for the
// given registries through hostsDir; nil means it would.
func CheckMirror(configFile string, daemonMajor int, hostsDir string, registries []string, mirror string) error {
	var problems []string
	paths, err := RegistryConfigPaths(configFile, daemonMajor)
	if err != nil {
		problems = append(problems, fmt.Sprintf("read containerd config %s: %v", configFile, err))
	} else {
		ok := false
		for _, p := range paths {
			if p == filepath.Clean(hostsDir) {
				ok = true
			}
		}
		if !ok {
			if len(paths) == 0 {
				problems = append(problems, fmt.Sprintf("containerd %d.x with %s sets no registry config_path, so it never reads hosts.toml files", daemonMajor, configFile))
			} else {
				problems = append(problems, fmt.Sprintf("containerd's registry config_path %q does not include %s", strings.Join(paths, ":"), hostsDir))
			}
		}
	}
	for _, r := range registries {
		reg, err := ParseRegistry(r)
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		path := HostsPath(hostsDir, reg.Host)
		ok, err := MirrorConfigured(path, mirror)
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("%s: %v", path, err))
		case !ok:
			problems = append(problems, fmt.Sprintf("%s does not name %s as its first host", path, mirror))
		}
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}
