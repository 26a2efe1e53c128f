package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/peerd-project/peerd/fusefs"
)

// fuseConfig holds the flags of the FUSE mount.
type fuseConfig struct {
	Mount         string
	ReadTimeout   time.Duration
	LookupTimeout time.Duration
	Passthrough   bool
	OCI           bool
}

// blobCatalog is another store whose blobs the mount lists and finds (the
// containerd content store): a part that has one appends it to
// a.blobCatalogs before startFUSE runs.
type blobCatalog = fusefs.Catalog

func registerFUSEFlags(fs *flag.FlagSet, c *fuseConfig) {
	fs.StringVar(&c.Mount, "mount", "/peerd/blobs", "where to mount the blob filesystem (<mount>/sha256/<hex>, read-only, lazily loaded); --mount= disables it")
	fs.DurationVar(&c.ReadTimeout, "mount-read-timeout", 30*time.Second, "a read under the mount that no source can serve within this time fails with EIO")
	fs.DurationVar(&c.LookupTimeout, "mount-lookup-timeout", 5*time.Second, "how long a lookup of a digest the node does not hold asks peers before answering ENOENT")
	fs.BoolVar(&c.OCI, "mount-oci", true, "show <mount>/oci/<registry>/<repository>:<tag>/ (or @sha256:<hex>): an image's or artifact's files by title, resolved at the registry (only --registries), read lazily through the cache and peers")
	fs.BoolVar(&c.Passthrough, "mount-passthrough", true, "let the kernel read cached, verified blobs straight from the cache file (FUSE passthrough, Linux 6.9+; falls back when unavailable)")
}

// startFUSE mounts the blob filesystem. It runs last, so reads can use every
// source the other parts set up.
func startFUSE(ctx context.Context, a *app) error {
	c := a.cfg.FUSE
	if c.Mount == "" {
		a.log.Info("blob filesystem disabled (--mount=)")
		return nil
	}
	var errs []error
	if c.ReadTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--mount-read-timeout %s: must be positive", c.ReadTimeout))
	}
	if c.LookupTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--mount-lookup-timeout %s: must be positive", c.LookupTimeout))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	var arts fusefs.Artifacts
	if res := a.artifacts(); c.OCI && res != nil {
		arts = res
	}
	f, err := fusefs.Mount(fusefs.Options{
		Artifacts:          arts,
		Mountpoint:         c.Mount,
		Cache:              a.cache,
		Plan:               a.planner(faceFUSE),
		Transfers:          a.transfers,
		Catalogs:           a.blobCatalogs,
		LookupTimeout:      c.LookupTimeout,
		ReadTimeout:        c.ReadTimeout,
		DisablePassthrough: !c.Passthrough,
		Prefetch:           a.cfg.Prefetch,
		PrefetchWorkers:    a.cfg.PrefetchWorkers,
		BackingDir:         filepath.Join(a.cfg.DataDir, "cache"),
		Logger:             a.log,
		Registerer:         a.reg,
	})
	if err != nil {
		// A node that cannot mount FUSE (no /dev/fuse, no privilege) still
		// serves the mirror and its peers: it keeps running and /readyz
		// names the problem, instead of crash-looping every face away.
		if _, serr := os.Stat("/dev/fuse"); serr != nil {
			// The mount's own error names the fallback (fusermount) that failed last.
			err = fmt.Errorf("no /dev/fuse (%w); %w", serr, err)
		}
		err = fmt.Errorf("blob filesystem not mounted at --mount %s: %s (fix: load the fuse module and give peerd /dev/fuse and CAP_SYS_ADMIN, e.g. a privileged container, then restart; or pass --mount= to run without it)", c.Mount, strings.TrimSpace(err.Error()))
		a.log.Error("blob filesystem unavailable; the other faces keep serving", "err", err)
		a.readyChecks = append(a.readyChecks, func() error { return err })
		return nil
	}
	a.onStop(f.Close)
	a.fuse = f
	return nil
}
