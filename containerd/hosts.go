package containerd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/peerd-project/peerd/internal/atomicfile"
	"github.com/pelletier/go-toml/v2"
)

// hosts.toml handling. peerd owns one marked block in each file; everything
// else in the file (the registry's own hosts, certificates, settings) is the
// user's and is kept as it is. A write over a file without peerd's block
// backs that file up (rewrites of peerd's own file leave the backup alone);
// Remove restores the backup, or strips the block when there is none.

const (
	blockBegin = "# BEGIN peerd mirror (written by 'peerd containerd-config'; undo with --remove)"
	blockEnd   = "# END peerd mirror"
	// BackupSuffix names the copy of a hosts.toml peerd found before its first write.
	BackupSuffix = ".peerd-orig"
	// DefaultDialTimeout keeps a dead peerd cheap: containerd moves on to the
	// next host when the mirror does not accept a connection this fast.
	DefaultDialTimeout = 200 * time.Millisecond
)

// HostsConfig says what to write.
type HostsConfig struct {
	// Dir is containerd's hosts folder (config_path), e.g. /etc/containerd/certs.d.
	Dir string
	// Registries are registry hosts ("docker.io", "ghcr.io", "127.0.0.1:5000"),
	// optionally with the server's scheme ("http://127.0.0.1:5000") for a
	// registry that speaks plain HTTP, or "_default" for every other registry.
	Registries []string
	// Mirror is peerd's HTTP address as containerd reaches it, e.g. http://127.0.0.1:30000.
	Mirror string
	// DialTimeout for the mirror; DefaultDialTimeout when zero.
	DialTimeout time.Duration
}

// domainRE is an image reference's domain: dot-separated labels of letters,
// digits and inner hyphens. The name becomes a folder and a URL host, so
// nothing else (slashes, dots alone, underscores) gets through.
var domainRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$`)

// Registry is one entry of HostsConfig.Registries, parsed.
type Registry struct {
	Host   string // folder name under Dir and the ?ns= value containerd sends
	Server string // "" for _default
}

// registryWant is what every refusal of a registry entry says it expects.
const registryWant = "want host[:port] as in an image reference (a hostname, an IPv4 address or a bracketed IPv6 address such as [::1]:5000; port 1-65535), optionally after http:// for a plain-HTTP registry"

// ParseRegistry parses one registry entry as flags and the environment give
// it: "docker.io", "ghcr.io:443", "[::1]:5000", "http://127.0.0.1:5000" or
// "_default". It is the one check of a registry name: anything it accepts
// is a folder name under the hosts folder and a URL host containerd reads.
func ParseRegistry(entry string) (Registry, error) {
	s := strings.TrimSpace(entry)
	if s == "_default" {
		return Registry{Host: s}, nil
	}
	bad := func(why string) (Registry, error) {
		return Registry{}, fmt.Errorf("registry %q: %s; %s", entry, why, registryWant)
	}
	scheme := "https"
	if i := strings.Index(s, "://"); i >= 0 {
		scheme, s = strings.ToLower(s[:i]), s[i+3:]
		if scheme != "http" && scheme != "https" {
			return bad("the scheme must be http or https")
		}
	}
	s = strings.TrimSuffix(s, "/")
	if s == "" {
		return bad("empty host")
	}
	host, port, hasPort := s, "", false
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return bad("no ] after the IPv6 address")
		}
		host, port = s[:end+1], s[end+1:]
		ip, err := netip.ParseAddr(host[1 : len(host)-1])
		if err != nil || !ip.Is6() || ip.Zone() != "" {
			return bad(fmt.Sprintf("%s is not an IPv6 address", host))
		}
		if port != "" && port[0] != ':' {
			return bad(fmt.Sprintf("%q after the IPv6 address", port))
		}
		port, hasPort = strings.CutPrefix(port, ":")
	} else {
		switch strings.Count(s, ":") {
		case 0:
		case 1:
			host, port, hasPort = strings.Cut(s, ":")
		default:
			return bad("an IPv6 address needs brackets")
		}
		if len(host) > 253 || !domainRE.MatchString(host) {
			return bad(fmt.Sprintf("%q is not a hostname or an IPv4 address", host))
		}
		// A name whose last label is a number is an IPv4 address to a URL
		// parser, so it must be a whole, valid one.
		last := host[strings.LastIndexByte(host, '.')+1:]
		if strings.Trim(last, "0123456789") == "" {
			if ip, err := netip.ParseAddr(host); err != nil || !ip.Is4() {
				return bad(fmt.Sprintf("%q is not an IPv4 address", host))
			}
		}
	}
	if hasPort {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || port != strconv.Itoa(n) {
			return bad(fmt.Sprintf("port %q is not a number from 1 to 65535", port))
		}
	}
	host = strings.ToLower(s)
	server := scheme + "://" + host
	if host == "docker.io" || host == "index.docker.io" || host == "registry-1.docker.io" {
		// containerd names Docker Hub images docker.io/..., but the API lives elsewhere.
		host, server = "docker.io", "https://registry-1.docker.io"
	}
	return Registry{Host: host, Server: server}, nil
}

func (c *HostsConfig) check() ([]Registry, error) {
	if c.Dir == "" {
		return nil, errors.New("empty hosts folder")
	}
	if len(c.Registries) == 0 {
		return nil, errors.New("no registries")
	}
	u, err := url.Parse(c.Mirror)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return nil, fmt.Errorf("mirror %q: want http(s)://host:port", c.Mirror)
	}
	c.Mirror = u.Scheme + "://" + u.Host
	if c.DialTimeout <= 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	var regs []Registry
	seen := map[string]bool{}
	for _, r := range c.Registries {
		reg, err := ParseRegistry(r)
		if err != nil {
			return nil, err
		}
		if !seen[reg.Host] {
			seen[reg.Host] = true
			regs = append(regs, reg)
		}
	}
	return regs, nil
}

// HostsPath is where containerd looks for a registry's hosts.toml.
func HostsPath(dir, registryHost string) string {
	return filepath.Join(dir, registryHost, "hosts.toml")
}

// WriteHosts writes (or refreshes) peerd's block in each registry's
// hosts.toml. It returns the files it changed.
func WriteHosts(c HostsConfig) ([]string, error) {
	regs, err := c.check()
	if err != nil {
		return nil, err
	}
	var changed []string
	for _, reg := range regs {
		path := HostsPath(c.Dir, reg.Host)
		old, err := os.ReadFile(path)
		exists := err == nil
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return changed, fmt.Errorf("read %s: %w", path, err)
		}
		if exists && !bytes.Contains(old, []byte(blockBegin)) {
			// Not (or no longer) peerd's: this is the original to restore.
			if err := atomicfile.Write(path+BackupSuffix, old, 0o644); err != nil {
				return changed, fmt.Errorf("back up %s: %w", path, err)
			}
		}
		next, err := render(stripBlock(old), reg, c.Mirror, c.DialTimeout)
		if err == nil {
			err = checkMerged(stripBlock(old), next, c.Mirror)
		}
		if err != nil {
			return changed, fmt.Errorf("%s: %w", path, err)
		}
		if exists && bytes.Equal(old, next) {
			continue
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return changed, err
		}
		if err := atomicfile.Write(path, next, 0o644); err != nil {
			return changed, err
		}
		changed = append(changed, path)
	}
	return changed, nil
}

// RemoveHosts undoes WriteHosts: it restores the backed-up original, or
// strips peerd's block, or deletes a file peerd created. It returns the
// files it changed.
func RemoveHosts(dir string, registries []string) ([]string, error) {
	// Every entry is checked before any file changes: a bad one refuses the
	// whole call, as in WriteHosts.
	var regs []Registry
	for _, r := range registries {
		reg, err := ParseRegistry(r)
		if err != nil {
			return nil, err
		}
		regs = append(regs, reg)
	}
	var changed []string
	for _, reg := range regs {
		path := HostsPath(dir, reg.Host)
		backup := path + BackupSuffix
		cur, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		} else if err != nil {
			return changed, fmt.Errorf("read %s: %w", path, err)
		}
		if !bytes.Contains(cur, []byte(blockBegin)) {
			continue // someone replaced peerd's file: theirs now
		}
		orig, err := os.ReadFile(backup)
		switch {
		case err == nil:
			if err := atomicfile.Write(path, orig, 0o644); err != nil {
				return changed, err
			}
			if err := os.Remove(backup); err != nil {
				return changed, err
			}
		case !errors.Is(err, fs.ErrNotExist):
			return changed, fmt.Errorf("read %s: %w", backup, err)
		case len(bytes.TrimSpace(stripBlock(cur))) == 0:
			// peerd created it.
			if err := os.Remove(path); err != nil {
				return changed, err
			}
			os.Remove(filepath.Dir(path)) // only if empty
		default:
			if err := atomicfile.Write(path, stripBlock(cur), 0o644); err != nil {
				return changed, err
			}
		}
		changed = append(changed, path)
	}
	return changed, nil
}

// MirrorConfigured reports whether path names mirror as its first host.
func MirrorConfigured(path, mirror string) (bool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	u, err := url.Parse(mirror)
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "[host.") {
			return line == fmt.Sprintf("[host.%q]", u.Scheme+"://"+u.Host), nil
		}
	}
	return false, nil
}

// stripBlock removes peerd's block (and only it) from a hosts.toml.
func stripBlock(b []byte) []byte {
	var out []string
	in := false
	for _, line := range strings.SplitAfter(string(b), "\n") {
		t := strings.TrimSpace(line)
		switch {
		case t == blockBegin:
			in = true
		case in && t == blockEnd:
			in = false
		case !in:
			out = append(out, line)
		}
	}
	return []byte(strings.Join(out, ""))
}

// render puts peerd's block after the file's top-level keys and before its
// first table, so the mirror is the first host containerd tries, the
// registry's own hosts follow, and the server stays the last resort.
func render(base []byte, reg Registry, mirror string, dial time.Duration) ([]byte, error) {
	lines := strings.SplitAfter(string(base), "\n")
	if len(lines) > 0 && lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	split := len(lines)
	hasServer := false
	depth := 0 // open brackets of a multi-line array value
	for i, line := range lines {
		t := strings.TrimSpace(stripComment(line))
		if depth == 0 && strings.HasPrefix(t, "[") {
			split = i
			break
		}
		if depth == 0 && (strings.HasPrefix(t, "server ") || strings.HasPrefix(t, "server=")) {
			hasServer = true
		}
		depth += strings.Count(t, "[") - strings.Count(t, "]")
		if depth < 0 {
			return nil, fmt.Errorf("line %d: unbalanced brackets", i+1)
		}
	}
	var b strings.Builder
	for _, l := range lines[:split] {
		b.WriteString(l)
		if !strings.HasSuffix(l, "\n") {
			b.WriteString("\n")
		}
	}
	b.WriteString(blockBegin + "\n")
	if !hasServer && reg.Server != "" {
		fmt.Fprintf(&b, "server = %q\n", reg.Server)
	}
	fmt.Fprintf(&b, "\n[host.%q]\n", mirror)
	b.WriteString("  capabilities = [\"pull\", \"resolve\"]\n")
	fmt.Fprintf(&b, "  dial_timeout = %q\n", dial.String())
	b.WriteString(blockEnd + "\n")
	for _, l := range lines[split:] {
		b.WriteString(l)
		if !strings.HasSuffix(l, "\n") {
			b.WriteString("\n")
		}
	}
	return []byte(b.String()), nil
}

// checkMerged makes sure containerd reads the mirror from a merge of an
// operator's valid file: render works line by line, and a multi-line
// string or an inline host table can defeat it (containerd ignores a file
// it cannot decode, the operator's hosts with it).
func checkMerged(base, merged []byte, mirror string) error {
	var before map[string]any
	if toml.Unmarshal(base, &before) != nil {
		return nil // containerd cannot read it now either
	}
	var after struct {
		Host map[string]any `toml:"host"`
	}
	if err := toml.Unmarshal(merged, &after); err != nil {
		return fmt.Errorf("peerd's block cannot be merged into this file (%v); add the mirror by hand", err)
	}
	if _, ok := after.Host[mirror]; !ok {
		return errors.New("peerd's block cannot be merged into this file (a multi-line string?); add the mirror by hand")
	}
	return readsMirrorFirst(merged, mirror)
}

// readsMirrorFirst asks containerd's own hosts.toml reader whether the
// merged file makes the mirror the first host. Some entries (a server that
// is no URL) make containerd drop the whole file without an error, and the
// mirror with it. A file containerd cannot read here at all (a CA path
// relative to the real folder) is not judged.
func readsMirrorFirst(merged []byte, mirror string) error {
	dir, err := os.MkdirTemp("", "peerd-hosts-check-")
	if err != nil {
		return nil
	}
	defer os.RemoveAll(dir)
	if os.WriteFile(filepath.Join(dir, "hosts.toml"), merged, 0o600) != nil {
		return nil
	}
	hosts, err := config.ConfigureHosts(context.Background(), config.HostOptions{
		HostDir: func(string) (string, error) { return dir, nil },
	})("registry.invalid")
	if err != nil || len(hosts) == 0 {
		return nil
	}
	m, err := url.Parse(mirror)
	if err != nil {
		return nil
	}
	if first := hosts[0].Scheme + "://" + hosts[0].Host; hosts[0].Scheme != m.Scheme || hosts[0].Host != m.Host {
		return fmt.Errorf("containerd would not use the mirror with this file (it reads %s first: an entry of the file, such as a server that is no URL, makes it ignore the file); fix the file or add the mirror by hand", first)
	}
	return nil
}

// stripComment drops a trailing # comment outside quotes.
func stripComment(line string) string {
	inStr := byte(0)
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case inStr != 0 && c == '\\' && inStr == '"':
			i++
		case inStr != 0 && c == inStr:
			inStr = 0
		case inStr == 0 && (c == '"' || c == '\''):
			inStr = c
		case inStr == 0 && c == '#':
			return line[:i]
		}
	}
	return line
}
