package doctor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	ctrd "github.com/peerd-project/peerd/containerd"
	"github.com/pelletier/go-toml/v2"
)

// Containerd is what the checks ask the running containerd.
type Containerd interface {
	// Version is containerd's version string ("v2.1.1", "1.6.20~ds1").
	Version(ctx context.Context) (string, error)
	// Plugins lists containerd's plugins with what each exports.
	Plugins(ctx context.Context) ([]Plugin, error)
}

// Plugin is one containerd plugin as its introspection service reports it.
type Plugin struct {
	Type, ID string
	Exports  map[string]string
	InitErr  string
}

// criImages is containerd 2.x's CRI image plugin; it exports the effective
// (defaulted) DiscardUnpackedLayers and RegistryConfigPath.
const criImages = "io.containerd.cri.v1.images"

// ctrdState is what containerd said, asked once per run.
type ctrdState struct {
	asked        bool
	version      string
	major, minor int
	err          error
	images       *Plugin // 2.x CRI image plugin, nil if absent or failed
	cfg          map[string]any
	cfgErr       error
}

func (in *Input) ctrd(ctx context.Context) *ctrdState {
	s := &in.cs
	if s.asked {
		return s
	}
	s.asked = true
	s.version, s.err = in.Containerd.Version(ctx)
	if s.err == nil {
		s.major, s.minor = parseVersion(s.version)
		if ps, err := in.Containerd.Plugins(ctx); err == nil {
			for i, p := range ps {
				if p.Type+"."+p.ID == criImages && p.InitErr == "" && p.Exports != nil {
					s.images = &ps[i]
				}
			}
		}
	}
	s.cfg, s.cfgErr = readTOML(in.ConfigFile)
	return s
}

// parseVersion reads "v2.1.0", "1.6.20~ds1" or "2.0.0-rc.1"; 0 when unknown.
func parseVersion(v string) (major, minor int) {
	v = strings.TrimPrefix(strings.TrimSpace(v), "v")
	parts := strings.SplitN(v, ".", 3)
	num := func(s string) int {
		end := strings.IndexFunc(s, func(r rune) bool { return r < '0' || r > '9' })
		if end >= 0 {
			s = s[:end]
		}
		n, _ := strconv.Atoi(s)
		return n
	}
	major = num(parts[0])
	if len(parts) > 1 {
		minor = num(parts[1])
	}
	return major, minor
}

func readTOML(path string) (map[string]any, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]any{}, nil // containerd runs on its defaults
	}
	if err != nil {
		return nil, err
	}
	m := map[string]any{}
	if err := toml.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return m, nil
}

// lookup follows keys through nested tables; ok is false when any is missing.
func lookup(m map[string]any, keys ...string) (any, bool) {
	var cur any = m
	for _, k := range keys {
		t, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = t[k]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// firstSet returns the first of several key paths the config sets.
func firstSet(m map[string]any, paths ...[]string) (any, string, bool) {
	for _, p := range paths {
		if v, ok := lookup(m, p...); ok {
			return v, tomlPath(p), true
		}
	}
	return nil, "", false
}

func tomlPath(p []string) string {
	var b strings.Builder
	for i, k := range p {
		if i > 0 {
			b.WriteByte('.')
		}
		if strings.ContainsAny(k, ".\"") {
			b.WriteString(strconv.Quote(k))
		} else {
			b.WriteString(k)
		}
	}
	return b.String()
}

// Where each setting lives: containerd 2.x's own tables first, then 1.x's
// (which 2.x migrates from a version 2 config), then the version 1 layout.
var (
	pathsDiscard = [][]string{
		{"plugins", criImages, "discard_unpacked_layers"},
		{"plugins", "io.containerd.grpc.v1.cri", "containerd", "discard_unpacked_layers"},
		{"plugins", "cri", "containerd", "discard_unpacked_layers"},
	}
	pathsLocalPull = [][]string{{"plugins", criImages, "use_local_image_pull"}}
)

// needContainerd: with the containerd integration off, the containerd
// check says so and the checks of its configuration have nothing to check.
func needContainerd(in *Input, check string) ([]Result, bool) {
	if in.Containerd != nil {
		return nil, true
	}
	if check == "containerd" {
		return []Result{{Check: check, Status: OK, Saw: "containerd integration off (--containerd-socket=)"}}, false
	}
	return nil, false
}

// CheckContainerd: containerd answers on --containerd-socket; its version.
func CheckContainerd(ctx context.Context, in *Input) []Result {
	if r, ok := needContainerd(in, "containerd"); !ok {
		return r
	}
	s := in.ctrd(ctx)
	if s.err != nil {
		return []Result{{Check: "containerd", Status: Fail, Saw: fmt.Sprintf("not reachable at %s: %v", in.Socket, s.err),
			Fix: "start containerd, or pass the socket it listens on as --containerd-socket (PEERD_CONTAINERD_SOCKET)"}}
	}
	return []Result{{Check: "containerd", Status: OK, Saw: fmt.Sprintf("reachable at %s, %s", in.Socket, s.version)}}
}

// configPaths is containerd's effective CRI registry config_path, and where
// it was read.
func (in *Input) configPaths(s *ctrdState) (paths []string, raw, source string, err error) {
	if s.images != nil {
		raw = s.images.Exports["RegistryConfigPath"]
		return splitPaths(raw), raw, "containerd's CRI image plugin", nil
	}
	paths, err = ctrd.RegistryConfigPaths(in.ConfigFile, s.major)
	return paths, strings.Join(paths, string(filepath.ListSeparator)), in.ConfigFile, err
}

func splitPaths(s string) []string {
	var out []string
	for _, p := range filepath.SplitList(s) {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, filepath.Clean(p))
		}
	}
	return out
}

func (in *Input) criTable(s *ctrdState) string {
	if s.major >= 2 {
		return `[plugins."io.containerd.cri.v1.images".registry]`
	}
	return `[plugins."io.containerd.grpc.v1.cri".registry]`
}

// CheckConfigPath: containerd's CRI registry config_path names --containerd-hosts-dir.
func CheckConfigPath(ctx context.Context, in *Input) []Result {
	const name = "config_path"
	if r, ok := needContainerd(in, name); !ok {
		return r
	}
	s := in.ctrd(ctx)
	paths, raw, source, err := in.configPaths(s)
	fix := fmt.Sprintf("set config_path = %q under %s in %s and restart containerd", in.HostsDir, in.criTable(s), in.ConfigFile)
	if err != nil {
		return []Result{{Check: name, Status: Fail, Saw: fmt.Sprintf("cannot read %s: %v", in.ConfigFile, err), Fix: fix}}
	}
	if len(paths) == 0 {
		if s.err != nil {
			// 2.x defaults to /etc/containerd/certs.d, 1.x reads no hosts.toml then.
			return []Result{{Check: name, Status: Warn, Saw: fmt.Sprintf("%s sets no registry config_path and containerd's version is unknown: 1.x would read no hosts.toml", source), Fix: fix}}
		}
		return []Result{{Check: name, Status: Fail, Saw: fmt.Sprintf("%s sets no registry config_path (containerd %s): containerd never reads hosts.toml", source, s.version), Fix: fix}}
	}
	for _, p := range paths {
		if p == filepath.Clean(in.HostsDir) {
			return []Result{{Check: name, Status: OK, Saw: fmt.Sprintf("%q (from %s) includes %s", raw, source, in.HostsDir)}}
		}
	}
	return []Result{{Check: name, Status: Fail, Saw: fmt.Sprintf("%q (from %s) does not include --containerd-hosts-dir %s", raw, source, in.HostsDir),
		Fix: fix + ", or pass that folder as --containerd-hosts-dir"}}
}

// CheckHosts: for every --registries entry, a hosts.toml whose first host is this mirror.
func CheckHosts(ctx context.Context, in *Input) []Result {
	if r, ok := needContainerd(in, "hosts.toml"); !ok {
		return r
	}
	if len(in.Registries) == 0 {
		return []Result{{Check: "hosts.toml", Status: Warn, Saw: "no --registries: containerd is sent to this mirror for no registry",
			Fix: "pass --registries (e.g. docker.io,ghcr.io) to 'peerd run' and 'peerd containerd-config'"}}
	}
	var out []Result
	for _, r := range in.Registries {
		reg, err := ctrd.ParseRegistry(r)
		if err != nil {
			out = append(out, Result{Check: "hosts.toml", Status: Fail, Saw: err.Error(), Fix: "correct --registries"})
			continue
		}
		name := "hosts.toml " + reg.Host
		path := ctrd.HostsPath(in.HostsDir, reg.Host)
		fix := fmt.Sprintf("run 'peerd containerd-config --hosts-dir %s --registries %s --mirror %s'", in.HostsDir, r, in.Mirror)
		first, err := ctrd.FirstHost(path)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			out = append(out, Result{Check: name, Status: Fail, Saw: path + " does not exist", Fix: fix})
		case err != nil:
			out = append(out, Result{Check: name, Status: Fail, Saw: err.Error(), Fix: fix})
		case first == "":
			out = append(out, Result{Check: name, Status: Fail, Saw: path + " lists no [host] before the registry", Fix: fix})
		case !sameHost(first, in.Mirror):
			out = append(out, Result{Check: name, Status: Fail, Saw: fmt.Sprintf("%s lists %s first, not this mirror %s", path, first, in.Mirror), Fix: fix})
		default:
			out = append(out, Result{Check: name, Status: OK, Saw: fmt.Sprintf("%s lists %s first", path, first)})
		}
	}
	return out
}

func sameHost(a, b string) bool {
	return strings.TrimSuffix(a, "/") == strings.TrimSuffix(b, "/")
}

// CheckTransfer: on containerd 2.1 and later, CRI pulls go through the
// transfer service unless the config makes CRI pull locally; the transfer
// service reads config_path as one folder, so a list (2.x's default
// "/etc/containerd/certs.d:/etc/docker/certs.d") makes it ignore hosts.toml.
func CheckTransfer(ctx context.Context, in *Input) []Result {
	const name = "transfer_service"
	if r, ok := needContainerd(in, name); !ok {
		return r
	}
	s := in.ctrd(ctx)
	if s.err != nil {
		return []Result{{Check: name, Status: Warn, Saw: "containerd not reachable: its version and pull mode unknown", Fix: "make the containerd check pass first"}}
	}
	if s.major < 2 || (s.major == 2 && s.minor < 1) {
		return []Result{{Check: name, Status: OK, Saw: fmt.Sprintf("containerd %s: CRI pulls do not use the transfer service", s.version)}}
	}
	if s.cfgErr != nil {
		return []Result{{Check: name, Status: Warn, Saw: fmt.Sprintf("cannot read %s: %v", in.ConfigFile, s.cfgErr), Fix: "pass containerd's config file as --containerd-config"}}
	}
	if s.images == nil {
		return []Result{{Check: name, Status: Warn, Saw: fmt.Sprintf("containerd %s runs no CRI image plugin (%s): Kubernetes cannot pull through it", s.version, criImages),
			Fix: "enable the CRI plugins in containerd's config (disabled_plugins)"}}
	}
	if why := localPullReason(s); why != "" {
		return []Result{{Check: name, Status: OK, Saw: fmt.Sprintf("containerd %s: CRI pulls locally (%s), reading hosts.toml from every config_path folder", s.version, why)}}
	}
	paths, raw, source, _ := in.configPaths(s)
	fix := fmt.Sprintf("set config_path = %q (one folder) under %s, or use_local_image_pull = true under [plugins.%q]", in.HostsDir, in.criTable(s), criImages)
	if len(paths) > 1 || strings.ContainsRune(raw, filepath.ListSeparator) {
		return []Result{{Check: name, Status: Fail, Saw: fmt.Sprintf("containerd %s pulls through the transfer service, which takes config_path %q (from %s) as one folder: it reads no hosts.toml", s.version, raw, source), Fix: fix}}
	}
	if len(paths) == 0 || paths[0] != filepath.Clean(in.HostsDir) {
		return []Result{{Check: name, Status: Fail, Saw: fmt.Sprintf("containerd %s pulls through the transfer service with config_path %q (from %s), not %s", s.version, raw, source, in.HostsDir), Fix: fix}}
	}
	return []Result{{Check: name, Status: OK, Saw: fmt.Sprintf("containerd %s pulls through the transfer service, which reads hosts.toml from %s", s.version, raw)}}
}

// localPullReason says why containerd's CRI pulls with its local client
// instead of the transfer service: use_local_image_pull, or a setting the
// transfer service does not support (containerd falls back to local pulls
// on any of them, see CheckLocalImagePullConfigs in containerd's CRI config);
// "" when it uses the transfer service.
func localPullReason(s *ctrdState) string {
	if v, p, ok := firstSet(s.cfg, pathsLocalPull...); ok && v == true {
		return p + " = true"
	}
	if s.images != nil && s.images.Exports["DiscardUnpackedLayers"] == "true" {
		return "discard_unpacked_layers = true"
	}
	for _, reg := range []string{criImages, "io.containerd.grpc.v1.cri"} {
		for _, k := range []string{"mirrors", "configs", "auths"} {
			if v, ok := lookup(s.cfg, "plugins", reg, "registry", k); ok {
				if m, ok := v.(map[string]any); ok && len(m) > 0 {
					return "registry." + k + " is set"
				}
			}
		}
	}
	if v, ok := lookup(s.cfg, "plugins", criImages, "max_concurrent_downloads"); ok && fmt.Sprint(v) != "3" {
		return "max_concurrent_downloads is not 3"
	}
	if v, ok := lookup(s.cfg, "plugins", criImages, "image_pull_with_sync_fs"); ok && v == true {
		return "image_pull_with_sync_fs = true"
	}
	if v, ok := lookup(s.cfg, "plugins", criImages, "disable_snapshot_annotations"); ok && v == false {
		return "disable_snapshot_annotations = false"
	}
	return ""
}

// CheckDiscard: discard_unpacked_layers = true makes containerd delete the
// layers it unpacked, so peers find nothing in its content store.
func CheckDiscard(ctx context.Context, in *Input) []Result {
	const name = "discard_unpacked_layers"
	if r, ok := needContainerd(in, name); !ok {
		return r
	}
	s := in.ctrd(ctx)
	var on bool
	var source string
	switch {
	case s.images != nil:
		on, source = s.images.Exports["DiscardUnpackedLayers"] == "true", "containerd's CRI image plugin"
	case s.cfgErr != nil:
		return []Result{{Check: name, Status: Warn, Saw: fmt.Sprintf("cannot read %s: %v", in.ConfigFile, s.cfgErr), Fix: "pass containerd's config file as --containerd-config"}}
	default:
		v, p, ok := firstSet(s.cfg, pathsDiscard...)
		on, source = ok && v == true, in.ConfigFile
		if ok {
			source += " " + p
		}
	}
	if !on {
		return []Result{{Check: name, Status: OK, Saw: "false (from " + source + "): containerd keeps the layers it unpacked"}}
	}
	table := `[plugins."io.containerd.grpc.v1.cri".containerd]`
	if s.major >= 2 {
		table = `[plugins."io.containerd.cri.v1.images"]`
	}
	fix := fmt.Sprintf("set discard_unpacked_layers = false under %s in %s and restart containerd", table, in.ConfigFile)
	if in.PullThrough {
		return []Result{{Check: name, Status: Warn, Saw: "true (from " + source + "): containerd deletes layers after unpacking; peers get them only while peerd's own cache holds them", Fix: fix}}
	}
	return []Result{{Check: name, Status: Fail, Saw: "true (from " + source + ") with --pull-through=false: containerd deletes layers after unpacking and peerd caches none, so this node shares no layer", Fix: fix}}
}
