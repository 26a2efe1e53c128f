package e2e

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// run runs one scenario, then resets what it left on the nodes and the
// registry and logs the disk the cluster uses: with the native snapshotter
// every layer's snapshot is a full copy of its parents, so images left by
// earlier scenarios fill the disk of a large run.
func (c *cluster) run(t *testing.T, name string, f func(*testing.T)) {
	t.Helper()
	// The peak matters, not the end: a scenario removes its own images.
	stop, peakc := make(chan struct{}), make(chan diskUsage, 1)
	go func() {
		var peak diskUsage
		for {
			if d := c.diskUse(); d.total() > peak.total() {
				peak = d
			}
			select {
			case <-stop:
				peakc <- peak
				return
			case <-time.After(500 * time.Millisecond):
			}
		}
	}()
	ran := false
	t.Run(name, func(t *testing.T) { ran = true; f(t) })
	close(stop)
	peak := <-peakc
	if !ran { // filtered out by -run: nothing to report or clean
		return
	}
	end := c.diskUse()
	c.resetImages()
	after := c.diskUse()
	fmt.Printf("e2e: disk during %s: peak %s (%s); at its end %s (%s); after cleanup %s (%s)\n",
		name, human(peak.total()), peak, human(end.total()), end, human(after.total()), after)
}

// resetImages removes every image, content blob and snapshot from each
// node's containerd and every repository and blob from the registry, so a
// scenario starts from the disk the cluster started with (peerd's own
// caches stay: they are bounded by --cache-size).
func (c *cluster) resetImages() {
	ctx := context.Background()
	for _, n := range c.nodes {
		if n.containerd == nil || !n.containerd.Running() {
			continue
		}
		ctr := func(args ...string) (string, error) {
			return sh(ctx, nsExec(n.ns, append([]string{n.ctr, "-a", n.sock, "-n", ctrdNS}, args...)...)...)
		}
		if out, err := ctr("images", "ls", "-q"); err == nil {
			for _, ref := range strings.Fields(out) {
				if n.containerised && c.criKeeps(ref) {
					continue
				}
				ctr("images", "rm", "--sync", ref)
			}
		}
		if n.containerised {
			// Its peerd runs from an image in this containerd, on a
			// snapshot: removing all content and snapshots would delete
			// the running container's root file system. The synchronous
			// garbage collection of images rm took the rest.
			continue
		}
		if out, err := ctr("content", "ls", "-q"); err == nil {
			if ds := strings.Fields(out); len(ds) > 0 {
				ctr(append([]string{"content", "rm"}, ds...)...)
			}
		}
		// A snapshot with children cannot go; remove leaves until none is left.
		for range 16 {
			out, err := ctr("snapshots", "--snapshotter", c.cfg.Snapshotter, "ls")
			if err != nil {
				break
			}
			var keys []string
			for _, line := range strings.Split(out, "\n")[1:] {
				if f := strings.Fields(line); len(f) > 0 {
					keys = append(keys, f[0])
				}
			}
			if len(keys) == 0 {
				break
			}
			for _, k := range keys {
				ctr("snapshots", "--snapshotter", c.cfg.Snapshotter, "rm", k)
			}
		}
	}
	// The registry keeps pushed images until garbage collection: drop its
	// storage (no scenario reuses another's image; it reads no cache).
	v2 := filepath.Join(c.dir, "registry", "data", "docker", "registry", "v2")
	for _, d := range []string{"blobs", "repositories"} {
		os.RemoveAll(filepath.Join(v2, d))
	}
	// The file origin's files likewise (each scenario writes its own).
	os.RemoveAll(filepath.Join(c.dir, "origin", "storage"))
}

// diskUsage is the cluster's disk use, by part, and the free space left.
type diskUsage struct {
	registry, containerd, peerd, other, free int64
	took                                     time.Duration
}

func (d diskUsage) total() int64 { return d.registry + d.containerd + d.peerd + d.other }

func (d diskUsage) String() string {
	return fmt.Sprintf("registry %s, containerd %s, peerd %s, other %s (free %s; measured in %v)",
		human(d.registry), human(d.containerd), human(d.peerd), human(d.other), human(d.free), d.took.Round(time.Millisecond))
}

// diskUse sums the allocated blocks under the work folder by part. It stays
// on the work folder's file system: FUSE mounts and tmpfs are not disk.
func (c *cluster) diskUse() diskUsage {
	start := time.Now()
	var d diskUsage
	var root syscall.Stat_t
	if err := syscall.Stat(c.dir, &root); err != nil {
		return d
	}
	filepath.WalkDir(c.dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		var st syscall.Stat_t
		if syscall.Lstat(path, &st) != nil {
			return nil
		}
		if st.Dev != root.Dev {
			if e.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if e.IsDir() {
			return nil
		}
		size := st.Blocks * 512
		rel, _ := filepath.Rel(c.dir, path)
		parts := strings.Split(rel, string(filepath.Separator))
		switch {
		case parts[0] == "registry":
			d.registry += size
		case len(parts) > 1 && parts[1] == "containerd":
			d.containerd += size
		case len(parts) > 1 && parts[1] == "data":
			d.peerd += size
		default:
			d.other += size
		}
		return nil
	})
	var sfs syscall.Statfs_t
	if syscall.Statfs(c.dir, &sfs) == nil {
		d.free = int64(sfs.Bavail) * sfs.Bsize
	}
	d.took = time.Since(start)
	return d
}
