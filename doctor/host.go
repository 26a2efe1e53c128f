package doctor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"syscall"
)

// FS is what the checks read from the local machine.
type FS interface {
	// Exists returns nil when path exists (stat, following links).
	Exists(path string) error
	// Statfs describes the filesystem holding path.
	Statfs(path string) (FSStat, error)
	// MountType is the filesystem type mounted exactly at path ("" if none).
	MountType(path string) (string, error)
	// Usage is the bytes the files under dir occupy.
	Usage(dir string) (int64, error)
	// KernelRelease is uname -r.
	KernelRelease() (string, error)
}

// FSStat is a filesystem's type and space.
type FSStat struct {
	Type         string // "ext4", "xfs", "tmpfs", or "0x…" when unknown
	Avail, Total int64
}

// FUSE is the daemon's own mount.
type FUSE interface {
	// Passthrough reports whether the kernel agreed to FUSE passthrough.
	Passthrough() bool
}

// CheckFUSE: /dev/fuse exists and a FUSE filesystem is mounted and alive at --mount.
func CheckFUSE(ctx context.Context, in *Input) []Result {
	const name = "fuse"
	if in.Mount == "" {
		return []Result{{Check: name, Status: OK, Saw: "blob filesystem off (--mount=)"}}
	}
	if err := in.FS.Exists("/dev/fuse"); err != nil {
		return []Result{{Check: name, Status: Fail, Saw: "/dev/fuse: " + errText(err),
			Fix: "load the fuse module (modprobe fuse) and give peerd the device (hostPath /dev/fuse, privileged), or pass --mount= to turn the mount off"}}
	}
	typ, err := in.FS.MountType(in.Mount)
	if err != nil {
		return []Result{{Check: name, Status: Fail, Saw: fmt.Sprintf("cannot read the mount table: %v", err), Fix: "run the doctor where peerd runs (same mount namespace)"}}
	}
	if !strings.HasPrefix(typ, "fuse") {
		saw := "nothing is mounted at " + in.Mount
		if typ != "" {
			saw = fmt.Sprintf("%s is a %s mount, not peerd's FUSE mount", in.Mount, typ)
		}
		return []Result{{Check: name, Status: Fail, Saw: saw, Fix: "start 'peerd run' (it mounts --mount), or pass the running daemon's --mount"}}
	}
	if err := in.FS.Exists(filepath.Join(in.Mount, "sha256")); err != nil {
		fix := "check peerd's log for why the mount stopped answering"
		if errors.Is(err, syscall.ENOTCONN) {
			fix = "the daemon behind it is gone: umount -l " + in.Mount + " and restart peerd"
		}
		return []Result{{Check: name, Status: Fail, Saw: fmt.Sprintf("%s is mounted but dead: %s", in.Mount, errText(err)), Fix: fix}}
	}
	return []Result{{Check: name, Status: OK, Saw: fmt.Sprintf("/dev/fuse present, %s mounted (%s) and answering", in.Mount, typ)}}
}

// passthroughMajor.passthroughMinor is the first Linux release with FUSE passthrough.
const passthroughMajor, passthroughMinor = 6, 9

// CheckPassthrough: whether the kernel reads cached blobs straight from the
// cache file, and why not.
func CheckPassthrough(ctx context.Context, in *Input) []Result {
	const name = "fuse_passthrough"
	switch {
	case in.Mount == "":
		return []Result{{Check: name, Status: OK, Saw: "blob filesystem off (--mount=)"}}
	case !in.Passthrough:
		return []Result{{Check: name, Status: Warn, Saw: "off (--mount-passthrough=false): every read of the mount goes through peerd",
			Fix: "drop --mount-passthrough=false unless the kernel's passthrough misbehaves"}}
	case in.FUSE != nil && in.FUSE.Passthrough():
		return []Result{{Check: name, Status: OK, Saw: "on: the kernel reads cached blobs from the cache file"}}
	}
	rel, err := in.FS.KernelRelease()
	if err == nil {
		if maj, min := parseVersion(rel); maj < passthroughMajor || (maj == passthroughMajor && min < passthroughMinor) {
			return []Result{{Check: name, Status: Warn, Saw: fmt.Sprintf("off: kernel %s has no FUSE passthrough (Linux 6.9+); reads go through peerd", rel),
				Fix: "upgrade the node's kernel to 6.9 or later for faster reads of cached blobs"}}
		}
	}
	if in.FUSE == nil {
		return []Result{{Check: name, Status: Warn, Saw: "unknown: only the running daemon knows what its kernel granted", Fix: "run 'peerd doctor' without --local while peerd runs"}}
	}
	return []Result{{Check: name, Status: Warn, Saw: fmt.Sprintf("off: kernel %s refused it (passthrough needs CAP_SYS_ADMIN in the initial user namespace)", rel),
		Fix: "run peerd privileged (or with CAP_SYS_ADMIN on the host)"}}
}

// lowFree is the free space below which the cache cannot work at all.
const lowFree = 256 << 20

// CheckCacheFS: the cache folder's filesystem, and its free space against --cache-size.
func CheckCacheFS(ctx context.Context, in *Input) []Result {
	const name = "cache_fs"
	dir := in.CacheDir
	// A cache not created yet lands on its nearest existing parent.
	for dir != "/" && dir != "." && in.FS.Exists(dir) != nil {
		dir = filepath.Dir(dir)
	}
	st, err := in.FS.Statfs(dir)
	if err != nil {
		return []Result{{Check: name, Status: Fail, Saw: fmt.Sprintf("statfs %s: %v", dir, err), Fix: "make --data-dir an existing, writable folder"}}
	}
	used, _ := in.FS.Usage(in.CacheDir) // 0 when the cache does not exist yet
	room := st.Avail + used
	saw := fmt.Sprintf("%s on %s: %s free, cache holds %s, --cache-size %s", in.CacheDir, st.Type, human(st.Avail), human(used), human(in.CacheSize))
	switch {
	case st.Avail < lowFree:
		return []Result{{Check: name, Status: Fail, Saw: saw, Fix: "free space on the cache's filesystem or move --data-dir to a larger one"}}
	case room < in.CacheSize:
		return []Result{{Check: name, Status: Warn, Saw: saw + ": the cache will fill the disk before its limit",
			Fix: fmt.Sprintf("lower --cache-size to at most %s or free space", human(room*9/10))}}
	case st.Type == "tmpfs" || st.Type == "ramfs":
		return []Result{{Check: name, Status: Warn, Saw: saw + ": the cache uses memory and is lost at reboot", Fix: "put --data-dir on a disk"}}
	case st.Type == "nfs" || strings.HasPrefix(st.Type, "fuse"):
		return []Result{{Check: name, Status: Warn, Saw: saw + ": a network or FUSE filesystem is slow and FUSE passthrough cannot stack on it", Fix: "put --data-dir on a local disk"}}
	}
	return []Result{{Check: name, Status: OK, Saw: saw}}
}

func errText(err error) string {
	if errors.Is(err, fs.ErrNotExist) {
		return "does not exist"
	}
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

func human(n int64) string {
	const unit = 1 << 10
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	v, suf := float64(n), []string{"KiB", "MiB", "GiB", "TiB", "PiB"}
	i := -1
	for v >= unit && i < len(suf)-1 {
		v /= unit
		i++
	}
	return fmt.Sprintf("%.1f%s", v, suf[i])
}
