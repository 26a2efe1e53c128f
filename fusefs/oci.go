package fusefs

import (
	"context"
	"errors"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/peerd-project/peerd/artifact"
	"github.com/peerd-project/peerd/blob"
)

// ociDirName is the tree of references: <mount>/oci/<registry>/<namespace…>/
// <name>:<tag>/ or <name>@sha256:<hex>/, each a directory of the manifest's
// files (package artifact).
const ociDirName = "oci"

// Artifacts resolves references for the oci tree.
type Artifacts interface {
	// Registries lists the registries a reference may name.
	Registries() []string
	Allowed(registry string) bool
	Resolve(ctx context.Context, registry, namespace string, ref artifact.Reference) (artifact.Tree, error)
}

var _ Artifacts = (*artifact.Resolver)(nil)

var (
	_ gofs.NodeLookuper   = (*ociDir)(nil)
	_ gofs.NodeReaddirer  = (*ociDir)(nil)
	_ gofs.NodeGetattrer  = (*ociDir)(nil)
	_ gofs.NodeCreater    = (*ociDir)(nil)
	_ gofs.NodeLookuper   = (*refDir)(nil)
	_ gofs.NodeReaddirer  = (*refDir)(nil)
	_ gofs.NodeGetattrer  = (*refDir)(nil)
	_ gofs.NodeMkdirer    = (*refDir)(nil)
	_ gofs.NodeUnlinker   = (*refDir)(nil)
	_ gofs.NodeSetattrer  = (*refDir)(nil)
	_ gofs.NodeSetxattrer = (*ociDir)(nil)
)

// ociDir is the oci folder (registry and namespace empty), a registry's
// folder (namespace empty) or a namespace in it. A registry cannot be
// listed, so only the oci folder lists anything: the allowed registries.
type ociDir struct {
	gofs.Inode
	readOnlyDir
	f         *FS
	registry  string
	namespace string
}

func (d *ociDir) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	return d.f.folderAttr(out)
}

// folderAttr is the attributes of the oci tree's read-only folders.
func (f *FS) folderAttr(out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o555
	out.Nlink = 2
	out.SetTimes(&f.started, &f.started, &f.started)
	return 0
}

func (d *ociDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	var ents []fuse.DirEntry
	if d.registry == "" {
		for _, r := range d.f.opts.Artifacts.Registries() {
			ents = append(ents, fuse.DirEntry{Name: r, Mode: syscall.S_IFDIR})
		}
	}
	return gofs.NewListDirStream(ents), 0
}

func (d *ociDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	a := d.f.opts.Artifacts
	dir := func(child *ociDir) (*gofs.Inode, syscall.Errno) {
		child.f, child.readOnlyDir = d.f, readOnlyDir{readOnly{d.f}}
		child.Getattr(ctx, nil, &fuse.AttrOut{})
		out.Mode = syscall.S_IFDIR | 0o555
		return d.NewInode(ctx, child, gofs.StableAttr{Mode: syscall.S_IFDIR}), 0
	}
	if d.registry == "" {
		if !a.Allowed(name) {
			d.f.m.lookups.WithLabelValues("invalid").Inc()
			return nil, syscall.ENOENT
		}
		return dir(&ociDir{registry: name})
	}
	if !artifact.IsReference(name) {
		ns := name
		if d.namespace != "" {
			ns = d.namespace + "/" + name
		}
		if !artifact.ValidRepoComponent(name) || len(ns) > artifact.MaxRepositoryLen {
			d.f.m.lookups.WithLabelValues("invalid").Inc()
			return nil, syscall.ENOENT
		}
		return dir(&ociDir{registry: d.registry, namespace: ns})
	}
	ref, err := artifact.ParseReference(name)
	if err != nil {
		d.f.m.lookups.WithLabelValues("invalid").Inc()
		d.f.logOnce("ref:"+d.registry+"/"+d.namespace+"/"+name, "oci reference does not parse; ENOENT", "err", err)
		return nil, syscall.ENOENT
	}
	ctx, cancel := d.f.opCtx(ctx, d.f.opts.LookupTimeout)
	defer cancel()
	t, err := a.Resolve(ctx, d.registry, d.namespace, ref)
	where := d.registry + "/" + d.namespace + "/" + name
	if err != nil {
		d.f.m.lookups.WithLabelValues("not_found").Inc()
		if errors.Is(err, artifact.ErrDenied) {
			d.f.logOnce("ref:"+where, "oci reference refused by its registry; EACCES", "ref", where, "err", err)
			return nil, syscall.EACCES
		}
		d.f.logOnce("ref:"+where, "oci reference not resolved; ENOENT", "ref", where, "err", err)
		return nil, syscall.ENOENT
	}
	for _, r := range t.Renamed {
		d.f.logOnce("renamed:"+string(t.Manifest)+r, "oci tree: layer shown by digest", "ref", where, "why", r)
	}
	d.f.m.lookups.WithLabelValues("resolved").Inc()
	rd := &refDir{f: d.f, readOnlyDir: readOnlyDir{readOnly{d.f}}, tree: t}
	out.Mode = syscall.S_IFDIR | 0o555
	if ref.Tag != "" {
		// A tag can move: the kernel asks again after the tag's TTL.
		out.SetEntryTimeout(artifact.DefaultTagTTL)
	}
	return d.NewInode(ctx, rd, gofs.StableAttr{Mode: syscall.S_IFDIR}), 0
}

// refDir is a resolved reference: the manifest's files.
type refDir struct {
	gofs.Inode
	readOnlyDir
	f    *FS
	tree artifact.Tree
}

func (d *refDir) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	return d.f.folderAttr(out)
}

func (d *refDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	ents := make([]fuse.DirEntry, len(d.tree.Files))
	for i, f := range d.tree.Files {
		ents[i] = fuse.DirEntry{Name: f.Name, Mode: syscall.S_IFREG, Ino: inoOf(f.Key)}
	}
	return gofs.NewListDirStream(ents), 0
}

func (d *refDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	for _, f := range d.tree.Files {
		if f.Name != name {
			continue
		}
		// The file is the blob's own node, the one sha256/<hex> shows, so
		// both names share its inode, page cache and open-mode bookkeeping.
		ch, errno := d.f.blobInode(ctx, &d.Inode, f.Key, f.Size, d.f.started, f.Origin)
		if errno != 0 {
			return nil, errno
		}
		ch.Operations().(*blobNode).fillAttr(&out.Attr)
		return ch, 0
	}
	return nil, syscall.ENOENT
}

// logOnce logs msg at most once a minute per key (a shell probing a path
// repeats the same lookup many times).
func (f *FS) logOnce(key, msg string, args ...any) {
	f.logMu.Lock()
	now := time.Now()
	if f.logged == nil || len(f.logged) > 1024 {
		f.logged = map[string]time.Time{}
	}
	if t, ok := f.logged[key]; ok && now.Sub(t) < time.Minute {
		f.logMu.Unlock()
		return
	}
	f.logged[key] = now
	f.logMu.Unlock()
	f.log.Info(msg, args...)
}

// blobInode returns the node of blob k under parent, creating it when new;
// origin, when the node has none yet, is where its missing bytes come from
// beyond this node and its peers.
func (f *FS) blobInode(ctx context.Context, parent *gofs.Inode, k blob.Key, size int64, mtime time.Time, origin blob.Source) (*gofs.Inode, syscall.Errno) {
	n := &blobNode{f: f, readOnly: readOnly{f}, key: k, size: size, mtime: mtime, origin: origin}
	ch := parent.NewInode(ctx, n, gofs.StableAttr{Mode: syscall.S_IFREG, Ino: inoOf(k)})
	got, ok := ch.Operations().(*blobNode)
	if !ok || got.key != k {
		// Two digests share the 64 bits the inode number is made of. Serving
		// the other blob's node would return the wrong bytes.
		f.log.Error("inode number collision between digests; refusing lookup", "key", k)
		return nil, syscall.EIO
	}
	if got != n && origin != nil {
		got.mu.Lock()
		if got.origin == nil {
			got.origin = origin
		}
		got.mu.Unlock()
	}
	return ch, 0
}
