// Package cripod runs a Kubernetes pod spec on a containerd through CRI the
// way kubelet translates it (host-network pods with hostPath volumes, what
// the chart's DaemonSet uses), with no kubelet, API server or CNI. The
// integration test of the chart's pod and the e2e cluster's containerised
// node share it.
package cripod

import (
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
)

// Config is a containerd 2.x config with its CRI plugin, everything under
// Dir, so it runs next to the machine's own containerd without touching it.
type Config struct {
	Dir          string // root, state, opt, runc state and the empty CNI folders go here
	Socket       string // gRPC socket; the ttrpc socket is Socket + ".ttrpc"
	HostsDir     string // registry config_path (the chart's containerd.hostsDir)
	Runc         string // runc binary
	SandboxImage string // pause image the CRI plugin uses and never pulls
	Snapshotter  string // what images unpack into (CRI and the transfer service)
	// NoDevHandler, if set, names a runtime handler that runs privileged
	// containers without the host's devices (a node without /dev/fuse).
	NoDevHandler string
}

// CNIBinDir and CNIConfDir are the CNI folders the CRI plugin wants even for
// host-network pods; they stay empty.
func (c Config) CNIBinDir() string  { return filepath.Join(c.Dir, "cni", "bin") }
func (c Config) CNIConfDir() string { return filepath.Join(c.Dir, "cni", "net.d") }

// Render is the version = 3 config.toml.
func (c Config) Render() (string, error) {
	var errs []error
	for _, f := range []struct{ name, v string }{{"Dir", c.Dir}, {"Socket", c.Socket}, {"HostsDir", c.HostsDir}, {"Runc", c.Runc}} {
		if !filepath.IsAbs(f.v) {
			errs = append(errs, fmt.Errorf("containerd CRI config: %s %q is not an absolute path", f.name, f.v))
		}
	}
	// Linux's sun_path holds 108 bytes; the ttrpc socket is the longer one.
	if ttrpc := c.Socket + ".ttrpc"; len(ttrpc) > 108 {
		errs = append(errs, fmt.Errorf("containerd CRI config: socket %s is %d bytes, a unix socket path has at most 108", ttrpc, len(ttrpc)))
	}
	if c.SandboxImage == "" || c.Snapshotter == "" {
		errs = append(errs, errors.New("containerd CRI config: SandboxImage and Snapshotter are required"))
	}
	if err := errors.Join(errs...); err != nil {
		return "", err
	}
	// runc keeps its state under Dir (Root), apart from the machine's. ctr's
	// import goes through the transfer service, which unpacks only for the
	// snapshotters it is configured for. restrict_oom_score_adj: never below
	// containerd's own OOM score, since a machine may forbid lowering it (as
	// a node in a container does).
	s := fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.nri.v1.nri"]
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/%[11]s"
    snapshotter = %[12]q
[plugins."io.containerd.cri.v1.images"]
  snapshotter = %[12]q
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = %[6]q
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = %[7]q
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [%[8]q]
    conf_dir = %[9]q
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = %[10]q
        Root = %[13]q
`, filepath.Join(c.Dir, "root"), filepath.Join(c.Dir, "state"), c.Socket, c.Socket+".ttrpc", filepath.Join(c.Dir, "opt"),
		c.SandboxImage, c.HostsDir, c.CNIBinDir(), c.CNIConfDir(), c.Runc, runtime.GOARCH, c.Snapshotter, filepath.Join(c.Dir, "runc"))
	if c.NoDevHandler != "" {
		s += fmt.Sprintf(`    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.%[1]s]
      runtime_type = "io.containerd.runc.v2"
      privileged_without_host_devices = true
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.%[1]s.options]
        BinaryName = %[2]q
        Root = %[3]q
`, c.NoDevHandler, c.Runc, filepath.Join(c.Dir, "runc"))
	}
	return s, nil
}
