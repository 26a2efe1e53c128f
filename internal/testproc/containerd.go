package testproc

import (
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"strings"
)

// Containerd is the config of a private containerd daemon a harness runs:
// everything it keeps lives under Dir, so several run side by side on one
// machine without touching the machine's own containerd.
type Containerd struct {
	Dir      string // root, state and opt go here
	Socket   string // gRPC socket; the ttrpc socket is Socket + ".ttrpc"
	HostsDir string // the registry hosts folder (config_path) peerd writes
	// V2 is set for containerd 2.x, whose ctr pulls through the transfer
	// service; that service unpacks only for the snapshotters it is
	// configured for, so it gets Snapshotter's. 1.x has no such service.
	V2          bool
	Snapshotter string
}

// sockMax is the longest path a unix socket may have: Linux's sun_path
// holds 108 bytes. The ttrpc socket, the longer of the two, is checked.
const sockMax = 108

// Render is the version = 2 config.toml, which both 1.x and 2.x read (2.x
// migrates it). CRI is off: ctr pulls need none of it and it costs CPU the
// cluster shares. Its registry section stays as a node's CRI setup would
// have it, because peerd checks that config_path names its hosts folder.
// NRI and the opt plugin default to machine-wide paths daemons must not
// share, so NRI is off and opt lives under Dir.
func (c Containerd) Render() (string, error) {
	var errs []error
	for _, f := range []struct{ name, v string }{{"Dir", c.Dir}, {"Socket", c.Socket}, {"HostsDir", c.HostsDir}} {
		if !filepath.IsAbs(f.v) {
			errs = append(errs, fmt.Errorf("containerd config: %s %q is not an absolute path", f.name, f.v))
		}
	}
	if ttrpc := c.Socket + ".ttrpc"; len(ttrpc) > sockMax {
		errs = append(errs, fmt.Errorf("containerd config: socket %s is %d bytes, a unix socket path has at most %d", ttrpc, len(ttrpc), sockMax))
	}
	if c.V2 && c.Snapshotter == "" {
		errs = append(errs, errors.New("containerd config: containerd 2.x needs the snapshotter its transfer service unpacks into"))
	}
	if err := errors.Join(errs...); err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, `version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
  "io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
# What a node's CRI setup would say; peerd's start-up check reads it.
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = %[6]q
`, filepath.Join(c.Dir, "root"), filepath.Join(c.Dir, "state"), c.Socket, c.Socket+".ttrpc", filepath.Join(c.Dir, "opt"), c.HostsDir)
	if c.V2 {
		fmt.Fprintf(&b, `[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/%s"
    snapshotter = %q
`, runtime.GOARCH, c.Snapshotter)
	}
	return b.String(), nil
}
