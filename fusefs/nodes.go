package fusefs

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"sort"
	"sync"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
)

const (
	dirName = blob.AlgSHA256
	dirIno  = 2
	ociIno  = 3
)

// readOnly answers every change with EROFS. The mount is read-only in the
// kernel already, which refuses these before they reach us; this is the
// second line for a mount made without it.
type readOnly struct{ f *FS }

func (r readOnly) refuse(op string) syscall.Errno {
	r.f.m.refused.WithLabelValues(op).Inc()
	r.f.log.Debug("refused change to read-only blob filesystem", "op", op)
	return syscall.EROFS
}

func (r readOnly) Setattr(context.Context, gofs.FileHandle, *fuse.SetAttrIn, *fuse.AttrOut) syscall.Errno {
	return r.refuse("setattr")
}
func (r readOnly) Setxattr(context.Context, string, []byte, uint32) syscall.Errno {
	return r.refuse("setxattr")
}
func (r readOnly) Removexattr(context.Context, string) syscall.Errno {
	return r.refuse("removexattr")
}

// readOnlyDir refuses changes to a directory's entries.
type readOnlyDir struct{ readOnly }

func (r readOnlyDir) Create(context.Context, string, uint32, uint32, *fuse.EntryOut) (*gofs.Inode, gofs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, r.refuse("create")
}
func (r readOnlyDir) Mkdir(context.Context, string, uint32, *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, r.refuse("mkdir")
}
func (r readOnlyDir) Mknod(context.Context, string, uint32, uint32, *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, r.refuse("mknod")
}
func (r readOnlyDir) Link(context.Context, gofs.InodeEmbedder, string, *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, r.refuse("link")
}
func (r readOnlyDir) Symlink(context.Context, string, string, *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, r.refuse("symlink")
}
func (r readOnlyDir) Unlink(context.Context, string) syscall.Errno { return r.refuse("unlink") }
func (r readOnlyDir) Rmdir(context.Context, string) syscall.Errno  { return r.refuse("rmdir") }
func (r readOnlyDir) Rename(context.Context, string, gofs.InodeEmbedder, string, uint32) syscall.Errno {
	return r.refuse("rename")
}

var (
	_ gofs.NodeCreater         = (*rootNode)(nil)
	_ gofs.NodeMkdirer         = (*rootNode)(nil)
	_ gofs.NodeOnAdder         = (*rootNode)(nil)
	_ gofs.NodeGetattrer       = (*rootNode)(nil)
	_ gofs.NodeLookuper        = (*dirNode)(nil)
	_ gofs.NodeReaddirer       = (*dirNode)(nil)
	_ gofs.NodeCreater         = (*dirNode)(nil)
	_ gofs.NodeMkdirer         = (*dirNode)(nil)
	_ gofs.NodeMknoder         = (*dirNode)(nil)
	_ gofs.NodeLinker          = (*dirNode)(nil)
	_ gofs.NodeSymlinker       = (*dirNode)(nil)
	_ gofs.NodeUnlinker        = (*dirNode)(nil)
	_ gofs.NodeRmdirer         = (*dirNode)(nil)
	_ gofs.NodeRenamer         = (*dirNode)(nil)
	_ gofs.NodeSetattrer       = (*dirNode)(nil)
	_ gofs.NodeOpener          = (*blobNode)(nil)
	_ gofs.NodeGetattrer       = (*blobNode)(nil)
	_ gofs.NodeSetattrer       = (*blobNode)(nil)
	_ gofs.NodeSetxattrer      = (*blobNode)(nil)
	_ gofs.NodeRemovexattrer   = (*blobNode)(nil)
	_ gofs.FileReader          = (*lazyFile)(nil)
	_ gofs.FileReleaser        = (*lazyFile)(nil)
	_ gofs.FileReader          = (*localFile)(nil)
	_ gofs.FilePassthroughFder = (*passFile)(nil)
)

// rootNode is the mountpoint: it holds the one directory "sha256".
type rootNode struct {
	gofs.Inode
	readOnlyDir
	f *FS
}

func (r *rootNode) OnAdd(ctx context.Context) {
	d := &dirNode{f: r.f, readOnlyDir: readOnlyDir{readOnly{r.f}}}
	r.AddChild(dirName, r.NewPersistentInode(ctx, d, gofs.StableAttr{Mode: syscall.S_IFDIR, Ino: dirIno}), false)
	if r.f.opts.Artifacts != nil {
		o := &ociDir{f: r.f, readOnlyDir: readOnlyDir{readOnly{r.f}}}
		r.AddChild(ociDirName, r.NewPersistentInode(ctx, o, gofs.StableAttr{Mode: syscall.S_IFDIR, Ino: ociIno}), false)
	}
}

func (r *rootNode) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o555
	out.Nlink = 3
	if r.f.opts.Artifacts != nil {
		out.Nlink++
	}
	out.SetTimes(&r.f.started, &r.f.started, &r.f.started)
	return 0
}

// dirNode is <mountpoint>/sha256: one file per blob, named by hex digest.
type dirNode struct {
	gofs.Inode
	readOnlyDir
	f *FS
}

func (d *dirNode) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o555
	out.Nlink = 2
	out.SetTimes(&d.f.started, &d.f.started, &d.f.started)
	return 0
}

// Lookup finds a blob by digest alone: in the cache, in the catalogs, then
// through the sources (peers), within the lookup timeout.
func (d *dirNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	k, err := blob.FromHex(name)
	if err != nil {
		// Shells and file managers probe many names; not worth more than debug.
		d.f.m.lookups.WithLabelValues("invalid").Inc()
		d.f.log.Debug("lookup of a name that is not a sha256 digest", "name", name)
		return nil, syscall.ENOENT
	}
	info, how, mark, err := d.f.resolve(ctx, k)
	if err != nil {
		d.f.m.lookups.WithLabelValues("not_found").Inc()
		if errors.Is(err, context.Canceled) && ctx.Err() != nil {
			return nil, syscall.EINTR
		}
		d.f.log.Info("lookup: blob not found", "key", k, "err", err)
		return nil, syscall.ENOENT
	}
	d.f.m.lookups.WithLabelValues(how).Inc()
	ch, errno := d.f.blobInode(ctx, &d.Inode, k, info.Size, info.ModTime, nil)
	if errno != 0 {
		return nil, errno
	}
	got := ch.Operations().(*blobNode)
	if mark != nil {
		got.mu.Lock()
		got.lookupMark = mark
		got.mu.Unlock()
	}
	got.fillAttr(&out.Attr)
	return ch, 0
}

// resolve reports the size and time of k, and where they were learned. When
// it fetched the blob's first chunk to learn them, mark is its handle's
// counting point, so that the file's first open counts that chunk as
// fetched, not cached.
func (f *FS) resolve(ctx context.Context, k blob.Key) (info cache.Info, how string, mark *cache.Mark, err error) {
	if info, ok := f.opts.Cache.Stat(k); ok {
		return withTime(info), "cached", nil, nil
	}
	ctx, cancel := f.opCtx(ctx, f.opts.LookupTimeout)
	defer cancel()
	for _, c := range f.opts.Catalogs {
		info, ok, err := c.Stat(ctx, k)
		if err != nil {
			f.log.Warn("lookup in catalog failed", "key", k, "err", err)
			continue
		}
		if ok && info.Size >= 0 {
			return withTime(info), "catalog", nil, nil
		}
	}
	plan := f.opts.Plan.Plan(k, nil)
	if plan.Empty() {
		return cache.Info{}, "", nil, blob.ErrNotFound
	}
	h := f.opts.Cache.Open(k, plan)
	defer h.Close()
	size, err := h.Size(ctx)
	if err != nil {
		return cache.Info{}, "", nil, err
	}
	info = h.Info()
	info.Size = size
	m := h.Mark()
	return withTime(info), "resolved", &m, nil
}

func withTime(i cache.Info) cache.Info {
	if i.ModTime.IsZero() {
		i.ModTime = time.Now()
	}
	return i
}

// opCtx bounds one operation by d, by the mount closing, and by the kernel
// interrupting the request (the caller was killed).
func (f *FS) opCtx(req context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(f.ctx, d)
	stop := context.AfterFunc(req, cancel)
	return ctx, func() { stop(); cancel() }
}

// inoOf derives a stable inode number from the digest, so the same blob
// keeps its number across lookups and restarts.
func inoOf(k blob.Key) uint64 {
	b, _ := hex.DecodeString(k.Hex()[:16])
	ino := binary.BigEndian.Uint64(b)
	if ino <= ociIno {
		ino += ociIno + 1
	}
	return ino
}

// Readdir lists what the node holds or knows, sorted by name.
func (d *dirNode) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	seen := map[blob.Key]bool{}
	for _, i := range d.f.opts.Cache.List() {
		if i.Key.Algorithm() == blob.AlgSHA256 && i.Size >= 0 {
			seen[i.Key] = true
		}
	}
	if len(d.f.opts.Catalogs) > 0 {
		cctx, cancel := d.f.opCtx(ctx, d.f.opts.LookupTimeout)
		for _, c := range d.f.opts.Catalogs {
			infos, err := c.List(cctx)
			if err != nil {
				d.f.log.Warn("listing catalog failed; directory shows the cache only", "err", err)
				continue
			}
			for _, i := range infos {
				if i.Key.Algorithm() == blob.AlgSHA256 && i.Size >= 0 {
					seen[i.Key] = true
				}
			}
		}
		cancel()
	}
	keys := make([]blob.Key, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	ents := make([]fuse.DirEntry, len(keys))
	for i, k := range keys {
		ents[i] = fuse.DirEntry{Name: k.Hex(), Mode: syscall.S_IFREG, Ino: inoOf(k)}
	}
	return gofs.NewListDirStream(ents), 0
}

// blobNode is one blob. Its size never changes: the name is the content.
type blobNode struct {
	gofs.Inode
	readOnly
	f     *FS
	key   blob.Key
	size  int64
	mtime time.Time

	mu sync.Mutex
	// origin is where missing bytes come from beyond this node and its
	// peers: the registry of the oci tree that named the blob (nil: the
	// origin a /blobs/ request recently named, if any).
	origin blob.Source
	// The kernel refuses (EIO) a passthrough open while a file of the same
	// inode is open through the page cache, and the other way round; these
	// counts keep every open on one side.
	cachedOpen int // lazyFile + localFile
	lazyOpen   int
	passOpen   int
	// pageCacheTrusted says the kernel's page cache for this inode holds only
	// verified bytes. Bytes read before verification may be peer bytes that
	// later fail it, so they must not survive into a keep-cache open.
	pageCacheTrusted bool
	lastErrLog       time.Time
	quietErrs        int
	// timedOut holds byte ranges a read recently gave up on. The kernel
	// retries a failed read-ahead page by page at once; without this each
	// retry would wait the full read timeout again.
	timedOut []span
	// lookupMark is where the lookup that fetched the first chunk started
	// counting; the next lazy open counts from it (cache.Handle.CountSince).
	lookupMark *cache.Mark
}

type span struct {
	off, end int64
	until    time.Time
}

// recentlyTimedOut reports whether [off, end) overlaps a range a read gave
// up on within the last few seconds.
func (n *blobNode) recentlyTimedOut(off, end int64) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	now := time.Now()
	live := n.timedOut[:0]
	hit := false
	for _, s := range n.timedOut {
		if now.Before(s.until) {
			live = append(live, s)
			hit = hit || (off < s.end && s.off < end)
		}
	}
	n.timedOut = live
	return hit
}

func (n *blobNode) noteTimeout(off, end int64) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.timedOut) >= 16 {
		n.timedOut = n.timedOut[1:]
	}
	n.timedOut = append(n.timedOut, span{off, end, time.Now().Add(min(n.f.opts.ReadTimeout, 5*time.Second))})
}

func (n *blobNode) fillAttr(a *fuse.Attr) {
	a.Mode = syscall.S_IFREG | 0o444
	a.Size = uint64(n.size)
	a.Blocks = (uint64(n.size) + 511) / 512
	a.Blksize = uint32(min(n.f.opts.MaxRead, 1<<20))
	a.Nlink = 1
	t := n.mtime
	a.SetTimes(&t, &t, &t)
}

func (n *blobNode) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fillAttr(&out.Attr)
	return 0
}

// Open picks how the file is read: passthrough, or pread of the backing
// file, when the blob is cached and verified; otherwise lazily through the
// cache.
func (n *blobNode) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&(syscall.O_TRUNC|syscall.O_APPEND|syscall.O_CREAT) != 0 {
		return nil, 0, n.refuse("open-write")
	}
	if n.f.ctx.Err() != nil {
		return nil, 0, syscall.EIO
	}
	c := n.f.opts.Cache
	n.mu.Lock()
	defer n.mu.Unlock()
	if info, ok := c.Stat(n.key); ok && info.Verified && info.Size == n.size {
		lr, _, err := c.OpenLocal(n.key, 0, -1)
		if err == nil {
			lf := &localFile{n: n, lr: lr, opened: time.Now()}
			if n.passOpen > 0 || (n.f.passthrough && n.cachedOpen == 0) {
				n.passOpen++
				n.f.m.opens.WithLabelValues("passthrough").Inc()
				return &passFile{lf}, 0, 0
			}
			n.cachedOpen++
			n.f.m.opens.WithLabelValues("local").Inc()
			if n.pageCacheTrusted {
				return lf, fuse.FOPEN_KEEP_CACHE, 0
			}
			// Without KEEP_CACHE the kernel drops the inode's pages on this
			// open; from here on they come from verified bytes only.
			if n.lazyOpen == 0 {
				n.pageCacheTrusted = true
			}
			return lf, 0, 0
		}
		n.f.log.Debug("verified blob not readable locally; reading through the cache", "key", n.key, "err", err)
	}
	h := c.Open(n.key, n.f.opts.Plan.Plan(n.key, n.origin))
	if n.lookupMark != nil {
		h.CountSince(*n.lookupMark)
		n.lookupMark = nil
	}
	if n.f.opts.Prefetch {
		h.Prefetch(n.f.opts.PrefetchWorkers)
	}
	n.cachedOpen++
	n.lazyOpen++
	n.pageCacheTrusted = false
	n.f.m.opens.WithLabelValues("lazy").Inc()
	return &lazyFile{n: n, h: h, opened: time.Now()}, 0, 0
}

// Flush answers ENOSYS once, and the kernel stops sending FLUSH on close
// for this mount: a read-only file has nothing to flush, and a close then
// never waits on this process.
func (n *blobNode) Flush(ctx context.Context, f gofs.FileHandle) syscall.Errno {
	return syscall.ENOSYS
}

// readFailed logs a failed read, at most every few seconds per blob: a
// reader retrying against a dead source must not flood the log.
func (n *blobNode) readFailed(off int64, size int, err error) {
	n.f.m.readErrors.Inc()
	n.mu.Lock()
	now := time.Now()
	if now.Sub(n.lastErrLog) < 5*time.Second {
		n.quietErrs++
		n.mu.Unlock()
		return
	}
	quiet := n.quietErrs
	n.lastErrLog, n.quietErrs = now, 0
	n.mu.Unlock()
	n.f.log.Warn("read failed; returning EIO", "key", n.key, "off", off, "len", size, "err", err, "suppressed", quiet)
}
