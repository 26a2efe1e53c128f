// Package fusefs presents blobs by digest as read-only files:
// <mountpoint>/sha256/<64 hex>. Opening a file costs nothing; its bytes are
// read through the content cache, chunk by chunk, only as they are read, so a
// program on the node can read a blob that lives on a peer as if it were local.
//
// Fully cached, verified blobs are handed to the kernel: with FUSE passthrough
// (Linux ≥ 6.9) reads go straight to the cache's backing file without a round
// trip through this process; without it, this process answers reads with
// positioned reads (pread) of the backing file, kept in the page cache across opens.
package fusefs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/transfer"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// Catalog is another place that knows blobs this node can serve (the
// containerd content store). Its blobs are listed in the directory and found
// by lookup; their bytes are still read through the cache and its sources.
type Catalog interface {
	// List reports the sha256 blobs the catalog holds.
	List(ctx context.Context) ([]cache.Info, error)
	// Stat reports one blob; ok is false when the catalog does not hold it.
	Stat(ctx context.Context, k blob.Key) (info cache.Info, ok bool, err error)
}

// Options configure a mount.
type Options struct {
	// Mountpoint is created if missing.
	Mountpoint string
	Cache      *cache.Cache
	// Plan says where the missing bytes of a blob come from (the mount knows
	// no origin of its own). Nil: nowhere; the mount shows what is cached.
	Plan cache.Planner
	// Transfers, when set, records each opened file's reads at release.
	Transfers *transfer.Log
	// Catalogs list further blobs this node knows.
	Catalogs []Catalog
	// Artifacts, when set, resolves the references of the oci folder.
	Artifacts Artifacts
	// LookupTimeout bounds resolving a digest the node does not hold; default 5s.
	LookupTimeout time.Duration
	// ReadTimeout bounds one read request: a read that cannot be served in
	// time fails with EIO; default 30s.
	ReadTimeout time.Duration
	// MaxRead is the largest read request and the kernel read-ahead window;
	// default 1 MiB.
	MaxRead int
	// DisablePassthrough keeps every read in this process (for comparison and
	// for kernels whose passthrough misbehaves).
	DisablePassthrough bool
	// Prefetch fetches the rest of a blob in the background when a file whose
	// blob is not fully cached is opened.
	Prefetch        bool
	PrefetchWorkers int
	// BackingDir is the cache's directory; its filesystem decides how deep
	// passthrough may stack.
	BackingDir string
	Logger     *slog.Logger
	Registerer prometheus.Registerer

	// writable mounts without the kernel's read-only flag, so tests reach the
	// EROFS handlers this package implements behind it.
	writable bool
}

// FS is a mounted blob filesystem.
type FS struct {
	opts   Options
	mp     string
	log    *slog.Logger
	m      *metrics
	server *fuse.Server

	// ctx ends when the mount is closing: reads and lookups in flight fail
	// at once instead of holding the unmount up.
	ctx    context.Context
	cancel context.CancelFunc

	passthrough bool
	started     time.Time // the directories' times
	root        *rootNode

	closeOnce sync.Once
	closeErr  error

	logMu  sync.Mutex
	logged map[string]time.Time // logOnce
}

// Mount prepares the mountpoint (creating it, clearing a stale mount a crash
// left behind) and mounts the filesystem read-only.
func Mount(opts Options) (*FS, error) {
	if opts.Cache == nil {
		return nil, errors.New("fusefs: no cache")
	}
	if opts.Mountpoint == "" {
		return nil, errors.New("fusefs: empty mountpoint")
	}
	mp, err := canonical(opts.Mountpoint)
	if err != nil {
		return nil, fmt.Errorf("fusefs: mountpoint %q: %w", opts.Mountpoint, err)
	}
	if opts.LookupTimeout <= 0 {
		opts.LookupTimeout = 5 * time.Second
	}
	if opts.ReadTimeout <= 0 {
		opts.ReadTimeout = 30 * time.Second
	}
	if opts.MaxRead <= 0 {
		opts.MaxRead = 1 << 20
	}
	if opts.PrefetchWorkers <= 0 {
		opts.PrefetchWorkers = 4
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	log := opts.Logger.With("component", "fusefs", "mountpoint", mp)
	if err := prepareMountpoint(mp, log); err != nil {
		return nil, err
	}

	f := &FS{opts: opts, mp: mp, log: log, m: newMetrics(opts.Registerer), started: time.Now()}
	f.ctx, f.cancel = context.WithCancel(context.Background())

	// The content never changes under a name, so the kernel may keep what it
	// learned; the timeouts only bound how long an evicted blob with no
	// source left still shows up.
	entryTTL, attrTTL, negTTL := 30*time.Second, 30*time.Second, time.Duration(0)
	flags := uintptr(syscall.MS_NOSUID | syscall.MS_NODEV)
	mopts := []string{"default_permissions"}
	if !opts.writable {
		flags |= syscall.MS_RDONLY
		mopts = append(mopts, "ro")
	}
	fopts := &gofs.Options{
		EntryTimeout:    &entryTTL,
		AttrTimeout:     &attrTTL,
		NegativeTimeout: &negTTL,
		MountOptions: fuse.MountOptions{
			FsName:           "peerd",
			Name:             "peerd",
			Options:          mopts,
			DirectMount:      true,
			DirectMountFlags: flags,
			// A node daemon serves every user and container on the node.
			AllowOther:         os.Geteuid() == 0,
			MaxWrite:           opts.MaxRead,
			MaxReadAhead:       opts.MaxRead,
			DisableReadDirPlus: true,
			// Replies are built in memory (ReadResultData); go-fuse's splice
			// path would only cost extra syscalls, and a full 1 MiB reply
			// does not fit the default pipe size.
			DisableSplice: true,
			MaxStackDepth: stackDepthFor(opts.BackingDir),
			Logger:        slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		},
	}
	root := &rootNode{f: f, readOnlyDir: readOnlyDir{readOnly{f}}}
	f.root = root
	server, err := gofs.Mount(mp, root, fopts)
	if err != nil {
		f.cancel()
		return nil, fmt.Errorf("fusefs: mount %s: %w", mp, err)
	}
	f.server = server
	f.passthrough = !opts.DisablePassthrough && server.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH != 0
	f.widenReadAhead()
	log.Info("mounted blob filesystem", "passthrough", f.passthrough, "max_read", opts.MaxRead,
		"read_timeout", opts.ReadTimeout, "lookup_timeout", opts.LookupTimeout)
	return f, nil
}

// Mountpoint is the absolute path of the mount.
func (f *FS) Mountpoint() string { return f.mp }

// Passthrough reports whether the kernel agreed to FUSE passthrough (and it
// is not disabled).
func (f *FS) Passthrough() bool { return f.passthrough }

// Close unmounts. Reads in flight fail with EIO at once; when a program still
// holds a file open the mount is detached lazily, so it disappears from the
// namespace now and the kernel tears it down when the last file closes.
func (f *FS) Close(ctx context.Context) error {
	f.closeOnce.Do(func() { f.closeErr = f.close(ctx) })
	return f.closeErr
}

func (f *FS) close(ctx context.Context) error {
	f.cancel()
	err := unmount(ctx, f.mp, false)
	detached := false
	if err != nil {
		f.log.Warn("mount busy (files open); detaching it", "err", err)
		if err := unmount(ctx, f.mp, true); err != nil {
			return fmt.Errorf("fusefs: unmount %s: %w", f.mp, err)
		}
		detached = true
	}
	done := make(chan struct{})
	go func() { f.server.Wait(); close(done) }()
	var wait <-chan time.Time
	if detached {
		// The connection lives until the last open file closes (or this
		// process exits); give cancelled requests a moment to answer.
		t := time.NewTimer(time.Second)
		defer t.Stop()
		wait = t.C
	}
	select {
	case <-done:
		f.log.Info("unmounted blob filesystem")
	case <-wait:
		f.log.Info("unmounted blob filesystem (detached; readers still hold files open)")
	case <-ctx.Done():
		f.log.Warn("unmounted blob filesystem; requests still in flight", "err", ctx.Err())
	}
	return nil
}

// widenReadAhead lifts the kernel's read-ahead for this mount from its
// 128 KiB default to MaxRead: the kernel clamps the INIT reply's
// max_readahead to the backing device's setting, which only root can raise.
func (f *FS) widenReadAhead() {
	var st unix.Stat_t
	if err := unix.Stat(f.mp, &st); err != nil {
		return
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	if err := os.WriteFile(p, []byte(strconv.Itoa(f.opts.MaxRead>>10)), 0); err != nil {
		f.log.Debug("cannot widen kernel read-ahead", "path", p, "err", err)
	}
}

// stackDepthFor picks the passthrough stacking depth: a backing file on a
// stacked filesystem (overlayfs in a container, another FUSE) needs room for
// one more level, or the kernel refuses the backing file.
func stackDepthFor(dir string) int {
	if dir == "" {
		return 1
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 1
	}
	const overlayMagic, fuseMagic, ecryptfsMagic = 0x794c7630, 0x65735546, 0xf15f
	switch st.Type {
	case overlayMagic, fuseMagic, ecryptfsMagic:
		return 2
	}
	return 1
}

// prepareMountpoint creates mp if needed and clears a stale FUSE mount (its
// daemon died: every access fails with "transport endpoint is not
// connected"). A live mount is left alone and reported.
func prepareMountpoint(mp string, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for try := 0; try < 8; try++ {
		if fstype, ok := mountedAt(mp); ok {
			// statfs always reaches the FUSE daemon; a stat may be answered
			// from the kernel's attribute cache even when the daemon is dead.
			var sfs syscall.Statfs_t
			err := syscall.Statfs(mp, &sfs)
			if err == nil {
				return fmt.Errorf("fusefs: %s is already mounted (%s); is another peerd running?", mp, fstype)
			}
			if !isStale(err) {
				return fmt.Errorf("fusefs: mountpoint %s (%s): %w", mp, fstype, err)
			}
			// Crashes can stack several dead mounts; peel them one by one.
			log.Warn("clearing stale mount left by a crash", "type", fstype, "err", err)
			if err := unmount(ctx, mp, true); err != nil {
				return fmt.Errorf("fusefs: clear stale mount at %s: %w", mp, err)
			}
			continue
		}
		st, err := os.Stat(mp)
		switch {
		case err == nil:
			if !st.IsDir() {
				return fmt.Errorf("fusefs: mountpoint %s is not a directory", mp)
			}
			return nil
		case isStale(err):
			// Mounted under another name of the same path (mount namespaces).
			log.Warn("clearing stale mount left by a crash", "err", err)
			if err := unmount(ctx, mp, true); err != nil {
				return fmt.Errorf("fusefs: clear stale mount at %s: %w", mp, err)
			}
		case errors.Is(err, fs.ErrNotExist):
			if err := os.MkdirAll(mp, 0o755); err != nil {
				return fmt.Errorf("fusefs: create mountpoint: %w", err)
			}
		default:
			return fmt.Errorf("fusefs: mountpoint %s: %w", mp, err)
		}
	}
	return fmt.Errorf("fusefs: mountpoint %s: still mounted after clearing 8 stale mounts", mp)
}

// canonical makes p absolute and resolves symlinks in its parent, so it
// matches /proc/self/mountinfo. The last element is not touched: a stale
// mount there fails every access.
func canonical(p string) (string, error) {
	p, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	dir, base := filepath.Split(p)
	for d := filepath.Clean(dir); ; {
		real, err := filepath.EvalSymlinks(d)
		if err == nil {
			rest, _ := filepath.Rel(d, filepath.Clean(dir))
			return filepath.Join(real, rest, base), nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return p, nil
		}
		d = parent
	}
}

func isStale(err error) bool {
	return errors.Is(err, syscall.ENOTCONN) || errors.Is(err, syscall.ECONNABORTED)
}

// unmount unmounts mp, lazily (MNT_DETACH) if asked. Root calls umount2
// directly; others go through the setuid fusermount helper.
func unmount(ctx context.Context, mp string, lazy bool) error {
	flags := 0
	if lazy {
		flags = syscall.MNT_DETACH
	}
	err := syscall.Unmount(mp, flags)
	if err == nil || !errors.Is(err, syscall.EPERM) {
		return err
	}
	bin, lerr := exec.LookPath("fusermount3")
	if lerr != nil {
		if bin, lerr = exec.LookPath("fusermount"); lerr != nil {
			return fmt.Errorf("%w (and no fusermount3/fusermount to fall back on)", err)
		}
	}
	arg := "-u"
	if lazy {
		arg = "-uz"
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, arg, mp).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s %s: %w: %s", bin, arg, mp, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// mountedAt reports whether a FUSE filesystem is mounted at mp, and its type.
func mountedAt(mp string) (string, bool) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", false
	}
	for _, line := range strings.Split(string(data), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f := strings.Fields(pre)
		pf := strings.Fields(post)
		if len(f) < 5 || len(pf) < 1 {
			continue
		}
		if unescapeMountinfo(f[4]) == mp && (pf[0] == "fuse" || strings.HasPrefix(pf[0], "fuse.")) {
			return pf[0], true
		}
	}
	return "", false
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
