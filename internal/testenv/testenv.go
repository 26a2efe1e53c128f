// Package testenv lets a test say what the machine must provide (root, a
// device, a Debian package, a tool that tools/test-setup.sh builds) and skip
// with the reason when it is missing. Under CI=true it fails instead: CI runs
// tools/test-setup.sh as root before the tests, so a missing piece there is a
// broken setup that would otherwise hide a whole test behind a skip.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// Prefix starts every skip reason this package writes, so the summary of
// `make test` can tell a missing environment from other skips.
const Prefix = "missing environment: "

// CI reports whether the tests run in CI (CI=true), where the setup must
// have provided everything.
func CI() bool { return os.Getenv("CI") == "true" }

// Missing skips t because the machine lacks what (how says how to get it),
// or fails it under CI=true.
func Missing(t testing.TB, what, how string) {
	t.Helper()
	msg := Prefix + what
	if how != "" {
		msg += " (" + how + ")"
	}
	if CI() {
		t.Fatalf("%s; CI=true: tools/test-setup.sh should have provided it", msg)
	}
	t.Skip(msg)
}

// NeedRoot skips (or fails under CI) unless the test runs as root; why says
// what needs it.
func NeedRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "root: "+why, "run make test as root; tools/test-setup.sh then installs what the tests need")
	}
}

// LookPath returns the path of the program bin, which Debian's package pkg
// provides, or skips (fails under CI) when it is not installed.
func LookPath(t testing.TB, bin, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(bin)
	if err != nil {
		Missing(t, bin+" not installed", fmt.Sprintf("apt-get install %s; tools/test-setup.sh does as root", pkg))
	}
	return p
}

// NeedFile skips (or fails under CI) unless path exists; what names it and
// how says how to get it.
func NeedFile(t testing.TB, path, how string) {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		Missing(t, path+": "+err.Error(), how)
	}
}

// NeedFUSE skips (or fails under CI) unless this process can mount a FUSE
// filesystem: /dev/fuse opens for reading and writing, and a user other
// than root has fusermount3 (fuse3) to mount with.
func NeedFUSE(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		Missing(t, "a usable /dev/fuse: "+err.Error(), "modprobe fuse and run as root; tools/test-setup.sh loads the module")
	}
	f.Close()
	if os.Geteuid() != 0 {
		LookPath(t, "fusermount3", "fuse3")
	}
}
