// Package containerd connects peerd to the node's containerd: it advertises
// every blob containerd holds to the peer network (and withdraws what
// containerd deletes), reads those blobs straight from containerd's content
// store for peers and for the OCI mirror (no second copy on disk), learns
// which registry and repository a digest came from, and writes the
// hosts.toml files that make containerd use peerd as a mirror.
package containerd

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus"
)

// ContentStore is what the package needs of containerd's content store;
// containerd's content.Store satisfies it.
type ContentStore interface {
	Info(ctx context.Context, dgst digest.Digest) (content.Info, error)
	ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error)
	Walk(ctx context.Context, fn content.WalkFunc, filters ...string) error
}

// ImageStore is what the package needs of containerd's image store;
// containerd's images.Store satisfies it.
type ImageStore interface {
	Get(ctx context.Context, name string) (images.Image, error)
	List(ctx context.Context, filters ...string) ([]images.Image, error)
}

// EventSource is containerd's event service (subscribe side).
type EventSource interface {
	Subscribe(ctx context.Context, filters ...string) (<-chan *events.Envelope, <-chan error)
}

// Backend is one connection to containerd.
type Backend struct {
	Content ContentStore
	Images  ImageStore
	Events  EventSource
	// Version reports the daemon's version, for logs; may be nil.
	Version func(ctx context.Context) (string, error)
	// Close releases the connection; may be nil.
	Close func() error
}

// SourceLabelPrefix prefixes the content labels containerd sets on pull.
const SourceLabelPrefix = "containerd.io/distribution.source."

// maxManifestSize bounds manifests and indexes read into memory; the
// distribution registry refuses larger ones too.
const maxManifestSize = 4 << 20

// rpcTimeout bounds one metadata call to containerd.
const rpcTimeout = 10 * time.Second

// Options configure a Store.
type Options struct {
	// Namespace is containerd's namespace to serve, e.g. "k8s.io".
	Namespace string
	// Connect opens a Backend; it is called again after containerd restarts.
	Connect func(ctx context.Context) (*Backend, error)
	// Announcer hears which blobs the store holds (the p2p node advertises
	// them); nil announces nothing.
	Announcer blob.Announcer
	// Resync is how often the whole store is walked again (containerd 1.x
	// sends no event when a blob is committed, and garbage collection sends
	// none when it deletes one). Default 1 minute.
	Resync time.Duration
	// OnSync, if set, hears containerd's version after every successful
	// resync (the first one after each connect, then periodic ones); it runs
	// on Run's goroutine and must not block long.
	OnSync func(version string)
	// Socket names the daemon in logs.
	Socket     string
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// entry is what the store knows of one committed blob.
type entry struct {
	size      int64
	mediaType string // "" until an image walk saw a descriptor for it
}

// Store tracks the blobs of one containerd namespace. It is safe for
// concurrent use. Run drives it; the read methods work whenever containerd
// is reachable.
type Store struct {
	opts    Options
	log     *slog.Logger
	m       *metrics
	lastErr atomic.Pointer[string] // why the last session ended (LastError)

	mu      sync.RWMutex
	be      *Backend // nil while disconnected
	blobs   map[digest.Digest]*entry
	version string

	resyncNow chan struct{}
	// walked maps image names to the target last walked; Run's goroutine only.
	walked map[string]digest.Digest
}

// New makes a Store; Run connects it.
func New(opts Options) *Store {
	if opts.Resync <= 0 {
		opts.Resync = time.Minute
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	s := &Store{
		opts:      opts,
		log:       opts.Logger.With("component", "containerd", "namespace", opts.Namespace),
		blobs:     map[digest.Digest]*entry{},
		walked:    map[string]digest.Digest{},
		resyncNow: make(chan struct{}, 1),
	}
	s.m = newMetrics(s, opts.Registerer)
	return s
}

func (s *Store) ctx(parent context.Context) context.Context {
	return namespaces.WithNamespace(parent, s.opts.Namespace)
}

func (s *Store) backend() *Backend {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.be
}

// Connected reports whether containerd answered the last resync.
func (s *Store) Connected() bool { return s.backend() != nil }

// LastError is why the last session with containerd ended or could not
// start ("" before any failure).
func (s *Store) LastError() string {
	if p := s.lastErr.Load(); p != nil {
		return *p
	}
	return ""
}

// Len is the number of blobs advertised.
func (s *Store) Len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.blobs)
}

// Has reports whether containerd holds k, by the store's index (no RPC).
func (s *Store) Has(k blob.Key) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	_, ok := s.blobs[digest.Digest(k)]
	return ok
}

// HoldsWhole reports whether containerd holds k: containerd commits content
// only once its digest checked, so what it holds is whole and verified.
func (s *Store) HoldsWhole(k blob.Key) bool { return s.Has(k) }

// Keys lists the advertised blobs, sorted.
func (s *Store) Keys() []blob.Key {
	s.mu.RLock()
	out := make([]blob.Key, 0, len(s.blobs))
	for d := range s.blobs {
		out = append(out, blob.Key(d))
	}
	s.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Size reports the size of k by the store's index (no RPC).
func (s *Store) Size(k blob.Key) (int64, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if e, ok := s.blobs[digest.Digest(k)]; ok {
		return e.size, true
	}
	return -1, false
}

// Version is the daemon's version as of the last connect, or "".
func (s *Store) Version() string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.version
}

// MediaType reports the media type an image descriptor gave k, or "".
func (s *Store) MediaType(k blob.Key) string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if e, ok := s.blobs[digest.Digest(k)]; ok {
		return e.mediaType
	}
	return ""
}

// Resolve returns the descriptor an image name ("<registry>/<repo>:<tag>")
// points to in containerd's image store. Unknown names wrap blob.ErrNotFound.
func (s *Store) Resolve(ctx context.Context, name string) (ocispec.Descriptor, error) {
	be := s.backend()
	if be == nil {
		return ocispec.Descriptor{}, fmt.Errorf("containerd: image %s: not connected: %w", name, blob.ErrNotFound)
	}
	ctx, cancel := context.WithTimeout(s.ctx(ctx), rpcTimeout)
	defer cancel()
	img, err := be.Images.Get(ctx, name)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return ocispec.Descriptor{}, fmt.Errorf("containerd: image %s: %w", name, blob.ErrNotFound)
		}
		return ocispec.Descriptor{}, fmt.Errorf("containerd: image %s: %w", name, err)
	}
	if _, err := blob.ParseDigest(img.Target.Digest.String()); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("containerd: image %s targets %q: %w", name, img.Target.Digest, blob.ErrNotFound)
	}
	return img.Target, nil
}

// put records a committed blob and reports whether it is new.
func (s *Store) put(d digest.Digest, size int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.blobs[d]
	if !ok {
		e = &entry{}
		s.blobs[d] = e
	}
	e.size = size
	return !ok
}

func (s *Store) setMediaType(d digest.Digest, mt string) {
	if mt == "" {
		return
	}
	s.mu.Lock()
	if e, ok := s.blobs[d]; ok {
		e.mediaType = mt
	}
	s.mu.Unlock()
}

// remove forgets a blob and withdraws it.
func (s *Store) remove(d digest.Digest) {
	s.mu.Lock()
	_, ok := s.blobs[d]
	delete(s.blobs, d)
	s.mu.Unlock()
	if ok {
		s.withdraw(blob.Key(d))
	}
}

func (s *Store) advertise(keys ...blob.Key) {
	if len(keys) == 0 {
		return
	}
	s.m.advertised.Add(float64(len(keys)))
	if s.opts.Announcer != nil {
		s.opts.Announcer.Holding(keys...)
	}
}

func (s *Store) withdraw(keys ...blob.Key) {
	if len(keys) == 0 {
		return
	}
	s.m.withdrawn.Add(float64(len(keys)))
	if s.opts.Announcer != nil {
		s.opts.Announcer.Dropped(keys...)
	}
}

// Source returns containerd's content store as a cache source: the cache
// fills from it before asking peers (FUSE reads, /blobs/ of a digest
// containerd already holds). containerd verified the bytes when it committed
// them, so they are trusted.
func (s *Store) Source() blob.Source { return source{s} }

type source struct{ s *Store }

// The store is a cache source (a plan's Local), and a local store the p2p
// data plane serves peers from (p2p.LocalStore's method, named here without
// importing p2p).
var (
	_ blob.Source = source{}
	_ interface {
		OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error)
	} = (*Store)(nil)
)

func (source) Name() string { return "containerd" }

func (src source) Fetch(ctx context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	b, err := src.s.Open(ctx, k)
	if err != nil {
		return nil, -1, err
	}
	size := b.Size()
	if off < 0 || off > size {
		b.Close()
		return nil, size, fmt.Errorf("containerd: offset %d outside %d-byte blob %s: %w", off, size, k, blob.ErrNotFound)
	}
	if n < 0 || n > size-off {
		n = size - off
	}
	// The reads end with the caller's context (a cache fill's deadline),
	// not only at Close.
	stop := context.AfterFunc(ctx, b.cancel)
	return &readCloser{Reader: bufio.NewReaderSize(io.NewSectionReader(b, off, n), ReadSize), c: b, stop: stop}, size, nil
}
