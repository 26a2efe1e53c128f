package doctor

import (
	"bufio"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// OS reads the machine the process runs on.
type OS struct{}

var _ FS = OS{}

func (OS) Exists(path string) error {
	_, err := os.Stat(path)
	return err
}

// fsTypes names the statfs magic numbers of filesystems a cache may sit on.
var fsTypes = map[int64]string{
	0xEF53:     "ext4",
	0x58465342: "xfs",
	0x9123683E: "btrfs",
	0x01021994: "tmpfs",
	0x858458F6: "ramfs",
	0x794C7630: "overlay",
	0x2FC12FC1: "zfs",
	0x6969:     "nfs",
	0x65735546: "fuse",
	0xF2F52010: "f2fs",
}

func (OS) Statfs(path string) (FSStat, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return FSStat{}, err
	}
	typ, ok := fsTypes[int64(st.Type)]
	if !ok {
		typ = fmt.Sprintf("0x%x", uint64(st.Type))
	}
	return FSStat{Type: typ, Avail: int64(st.Bavail) * int64(st.Bsize), Total: int64(st.Blocks) * int64(st.Bsize)}, nil
}

// MountType reads /proc/self/mountinfo; the last mount at path is the visible one.
func (OS) MountType(path string) (string, error) {
	want, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	typ := ""
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superopts
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || unescapeOctal(fields[4]) != want {
			continue
		}
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) {
				typ = fields[i+1]
				break
			}
		}
	}
	return typ, sc.Err()
}

// unescapeOctal undoes mountinfo's \040-style escapes.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var c byte
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &c); err == nil {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// usageLimit bounds the files Usage looks at, so a huge folder cannot stall a check.
const usageLimit = 200000

func (OS) Usage(dir string) (int64, error) {
	var total int64
	n := 0
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil // a file removed while walking
		}
		if n++; n > usageLimit {
			return filepath.SkipAll
		}
		if d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				if st, ok := fi.Sys().(*unix.Stat_t); ok {
					total += st.Blocks * 512 // allocated, not apparent: sparse chunks count as they are
				} else {
					total += fi.Size()
				}
			}
		}
		return nil
	})
	return total, err
}

func (OS) KernelRelease() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	return unix.ByteSliceToString(u.Release[:]), nil
}
