//go:build linux

package itest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/peerd-project/peerd/internal/reliability"
)

// A power cut is simulated by shutting the cache's filesystem down without
// flushing anything: FS_IOC_GOINGDOWN (_IOR('X', 125, __u32)) with
// FSOP_FLAGS_NOLOGFLUSH, what `xfs_io -x -c "shutdown"` issues. Writes not
// made durable by an fsync before it are lost, as in a power cut, while an
// in-process crash (kill -9) would keep them in the page cache.
const (
	fsIocGoingDown    = 0x8004587d
	fsGoingDownNoLogs = 2 // FSOP_FLAGS_NOLOGFLUSH
)

// powerCutChunk is the chunk size of the power-cut tests: small chunks give
// many flushes' worth of chunks in a short throttled fill.
const powerCutChunk = 256 << 10

// loopFS is an ext4 filesystem on a file-backed loop device.
type loopFS struct {
	t     testing.TB
	img   string
	dir   string // mount point
	opts  string
	mount bool
	dev   string // the loop device of the current mount
}

// needLoopFS skips the test when it cannot mount a loop device.
func needLoopFS(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a loop device needs root; CI (.ci/run) runs this as root")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skip("no loop device support: ", err)
	}
	for _, tool := range []string{"mkfs.ext4", "mount", "umount", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skip(tool+" not installed: ", err)
		}
	}
}

// newLoopFS makes and mounts a fresh ext4 filesystem of size bytes.
func newLoopFS(t *testing.T, size int64, opts string) *loopFS {
	t.Helper()
	dir := t.TempDir()
	fs := &loopFS{t: t, img: filepath.Join(dir, "fs.img"), dir: filepath.Join(dir, "mnt"), opts: opts}
	if err := os.Mkdir(fs.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(fs.img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", fs.img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	if err := fs.Mount(); err != nil {
		t.Skip("cannot mount a loop device here: ", err)
	}
	t.Cleanup(fs.Unmount)
	return fs
}

// Mount attaches the image to a loop device of its own and mounts it. A
// fresh device each time matters: a process that made a mount namespace
// while the filesystem was mounted (ip netns exec, unshare) keeps a copy of
// the mount, and with it the shut-down superblock; a remount through the same
// device would get that superblock back and fail every read with EIO.
func (fs *loopFS) Mount() error {
	out, err := exec.Command("losetup", "--find", "--show", fs.img).CombinedOutput()
	if err != nil {
		return fmt.Errorf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	args := []string{"-t", "ext4"}
	if fs.opts != "" {
		args = append(args, "-o", fs.opts)
	}
	out, err = exec.Command("mount", append(args, dev, fs.dir)...).CombinedOutput()
	if err != nil {
		exec.Command("losetup", "-d", dev).Run()
		return fmt.Errorf("mount: %v: %s", err, out)
	}
	fs.mount, fs.dev = true, dev
	return nil
}

// Unmount unmounts and detaches the loop device.
func (fs *loopFS) Unmount() {
	if !fs.mount {
		return
	}
	var out []byte
	var err error
	for try := 0; try < 50; try++ {
		if out, err = exec.Command("umount", fs.dir).CombinedOutput(); err == nil {
			fs.mount = false
			exec.Command("losetup", "-d", fs.dev).Run()
			return
		}
		time.Sleep(100 * time.Millisecond) // a killed process may still hold a file open for a moment
	}
	fs.t.Errorf("umount %s: %v: %s", fs.dir, err, out)
}

// PowerCut shuts the filesystem down without flushing its journal or any
// dirty page, unmounts it and drops the page cache, so that what a remount
// sees is what had reached the disk.
func (fs *loopFS) PowerCut(beforeUnmount func()) {
	fs.t.Helper()
	d, err := os.Open(fs.dir)
	if err != nil {
		fs.t.Fatal(err)
	}
	err = unix.IoctlSetPointerInt(int(d.Fd()), fsIocGoingDown, fsGoingDownNoLogs)
	d.Close()
	if err != nil {
		fs.t.Fatalf("FS_IOC_GOINGDOWN: %v", err)
	}
	beforeUnmount()
	fs.Unmount()
	if fs.mount {
		fs.t.FailNow()
	}
	unix.Sync() // other filesystems' dirty pages, so that drop_caches drops everything it can
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		fs.t.Fatalf("drop caches: %v", err)
	}
}

// cachedChunks reads the chunk map and data file of the one cached blob
// in peerd's data folder dataDir and returns the indexes of the chunks marked present and
// the data file.
func cachedChunks(t *testing.T, dataDir string) (present []int, nChunks int, dataFile []byte) {
	t.Helper()
	maps, _ := filepath.Glob(filepath.Join(dataDir, "cache", "blobs", "*", "*", "chunks"))
	if len(maps) == 0 {
		return nil, 0, nil // the blob's folder did not reach the disk: nothing is claimed
	}
	if len(maps) > 1 {
		t.Fatalf("%d cached blobs, want 1: %v", len(maps), maps)
	}
	states, err := os.ReadFile(maps[0])
	if err != nil {
		t.Fatal(err)
	}
	dataFile, err = os.ReadFile(filepath.Join(filepath.Dir(maps[0]), "data"))
	if err != nil {
		t.Fatal(err)
	}
	for i, s := range states {
		if s != 0 {
			present = append(present, i)
		}
	}
	return present, len(states), dataFile
}

func chunkRange(i, size int) (int, int) {
	from := i * powerCutChunk
	to := min(from+powerCutChunk, size)
	return from, to
}

// TestPowerCutMidFill cuts the power (a filesystem shutdown without flush)
// under a real peerd filling a large blob, at several points of the fill,
// and checks that after a remount and a restart every chunk marked present
// holds exactly the origin's bytes, on disk and as peerd serves it.
func TestPowerCutMidFill(t *testing.T) {
	if testing.Short() {
		t.Skip("mounts a filesystem per cut point and runs a throttled fill")
	}
	needLoopFS(t)
	origin := NewOrigin(t, "")
	data, dg := RandomBlob(t, 64<<20)
	path := storagePath(dg)
	origin.Put(path, data)

	type cut struct {
		flushes       int
		kept, fetched int
		chunks        int
	}
	var cuts []cut
	for _, flushes := range []int{1, 3, 6} {
		t.Run(fmt.Sprintf("after%dflushes", flushes), func(t *testing.T) {
			fs := newLoopFS(t, 256<<20, powerCutMountOpts)
			dataDir := filepath.Join(fs.dir, "peerd")
			origin.Fail.Store(false)
			origin.Delay.Store(int64(100 * time.Millisecond))
			n := StartNode(t, NodeOpts{DataDir: dataDir, Args: []string{
				"--upstream-allow", origin.Host, "--chunk-size", "256KiB",
				"--prefetch", "--prefetch-workers", "2"}})
			u := n.URL("/blobs/" + origin.URL + path)
			if code, _, _ := Get(t, "GET", u, map[string]string{"Range": "bytes=0-0"}); code != 206 {
				t.Fatalf("first read: status %d", code)
			}
			// The cache flushes once a second from its start; cut half a
			// period after the wanted flush.
			time.Sleep(time.Duration(flushes)*time.Second + 500*time.Millisecond)
			fetched := int(n.Metric(t, "peerd_cache_size_bytes") / powerCutChunk)
			fs.PowerCut(n.Kill)
			if err := fs.Mount(); err != nil {
				t.Fatal(err)
			}
			present, nChunks, file := cachedChunks(t, dataDir)
			if nChunks > 0 && nChunks != (len(data)+powerCutChunk-1)/powerCutChunk {
				t.Fatalf("chunk map of %d chunks for a blob of %d", nChunks, len(data))
			}
			if len(present) == nChunks && nChunks > 0 {
				t.Fatalf("all %d chunks present: the cut did not land mid-fill", nChunks)
			}
			bad := 0
			for _, i := range present {
				from, to := chunkRange(i, len(data))
				if !bytes.Equal(file[from:to], data[from:to]) {
					if bad < 5 {
						t.Errorf("chunk %d is marked present but its bytes on disk differ from the origin's", i)
					}
					bad++
				}
			}
			if bad > 0 {
				t.Fatalf("%d of %d chunks marked present hold wrong bytes after the power cut", bad, len(present))
			}

			// peerd, restarted on the remounted cache with the origin
			// failing, serves the kept chunks, and exactly the origin's bytes.
			origin.Delay.Store(0)
			origin.Fail.Store(true)
			n.start()
			for _, i := range present {
				from, to := chunkRange(i, len(data))
				code, _, body := Get(t, "GET", u, map[string]string{"Range": fmt.Sprintf("bytes=%d-%d", from, to-1)})
				if code != 206 || !bytes.Equal(body, data[from:to]) {
					t.Fatalf("restarted peerd serves kept chunk %d: status %d, bytes equal %v", i, code, bytes.Equal(body, data[from:to]))
				}
			}
			// And with the origin back, the whole blob.
			origin.Fail.Store(false)
			if code, _, body := Get(t, "GET", u, nil); code != 200 || !bytes.Equal(body, data) {
				t.Fatalf("whole blob after the power cut: status %d, bytes equal %v", code, bytes.Equal(body, data))
			}
			t.Logf("cut after %d flushes: %d of %d chunks kept, %d filled before the cut", flushes, len(present), nChunks, fetched)
			cuts = append(cuts, cut{flushes: flushes, kept: len(present), fetched: fetched, chunks: nChunks})
		})
	}
	if t.Failed() || len(cuts) < 3 {
		return
	}
	kept, total := 0, 0
	var figs []string
	for _, c := range cuts {
		kept += c.kept
		total += (len(data) + powerCutChunk - 1) / powerCutChunk
		figs = append(figs, fmt.Sprintf("after %d flushes: %d kept of %d filled", c.flushes, c.kept, c.fetched))
	}
	if kept == 0 {
		t.Fatal("no cut point kept any chunk: the test proves nothing (nothing was made durable before the cut)")
	}
	reliability.Record(t, reliability.Row{
		Area:    "crash",
		Case:    fmt.Sprintf("power cut (fs shutdown without flush, ext4 %s) mid-fill at %d cut points", powerCutMountOpts, len(cuts)),
		Outcome: fmt.Sprintf("every chunk marked present read back exactly; %d of %d chunks kept", kept, total),
		Figure:  strings.Join(figs, "; ") + fmt.Sprintf(" (%d KiB chunks)", powerCutChunk>>10),
	})
}

// powerCutMountOpts are the ext4 mount options of the power-cut tests:
// ext4's defaults, data=ordered with delayed allocation. The data file's
// blocks are then allocated only at writeback, so the journal commit that
// the chunk map's fdatasync forces does not write them, and a flush that
// skipped the data file's sync leaves chunks marked present over holes.
// With nodelalloc that commit writes the newly allocated data blocks first
// and hides most such losses; do not add it.
const powerCutMountOpts = "data=ordered"
