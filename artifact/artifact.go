// Package artifact turns an OCI reference — an image, or an artifact such as
// model weights pushed with ORAS — into the files the blob filesystem shows
// for it: <mount>/oci/<registry>/<repository>/<name>:<tag>/ (or
// <name>@sha256:<hex>/). A tag is resolved at its registry; the manifest and
// every file are then read by digest through the cache, so they come from
// this node, its peers or the registry like every other blob, and are
// verified before anyone else is served them.
package artifact

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/upstream"
)

const (
	// MaxManifestBytes bounds a manifest or index read for a tree.
	MaxManifestBytes = 4 << 20
	// MaxRepositoryLen bounds a repository name (registries commonly
	// refuse longer ones).
	MaxRepositoryLen = 255
	// DefaultTagTTL is how long a tag's digest is trusted before it is
	// asked at the registry again: a pushed tag shows up within it, and a
	// tree read by thousands of processes costs one request per interval.
	DefaultTagTTL = 30 * time.Second
	// maxTags bounds the remembered tag answers, maxKeptManifest the
	// manifest each keeps (larger ones are read by digest again).
	maxTags         = 1024
	maxKeptManifest = 16 << 10
	// TitleAnnotation names a layer's file (ORAS and most artifact tools set it).
	TitleAnnotation = "org.opencontainers.image.title"
	// ManifestName and ConfigName are the tree's own files.
	ManifestName = "manifest.json"
	ConfigName   = "oci-config.json"
)

// ErrDenied wraps a registry's refusal (401, 403): the mount answers EACCES.
var ErrDenied = errors.New("the registry refused access")

// manifestAccept lists every manifest type, so a registry returns a
// manifest by digest as stored rather than converting it.
const manifestAccept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, " +
	"application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json"

// File is one entry of a tree: a blob by digest and where to fetch it when
// neither this node nor a peer holds it.
type File struct {
	Name   string
	Key    blob.Key
	Size   int64
	Origin blob.Source
}

// Tree is what a reference resolved to.
type Tree struct {
	Manifest blob.Key
	Files    []File // sorted by name
	// Renamed lists the layers shown by digest although they carry a title
	// (an unsafe title, a reserved name, or one that two layers share).
	Renamed []string
}

// Options configure a Resolver.
type Options struct {
	// Registries maps each registry a reference may name (host[:port], as
	// in an image reference) to the base URL it is read from.
	Registries map[string]string
	// Upstream makes the registry requests.
	Upstream *upstream.Client
	// Auth answers registries' credential challenges (nil: anonymous).
	Auth upstream.Authorizer
	// Cache reads manifests by digest; Plan says from where.
	Cache *cache.Cache
	Plan  cache.Planner
	// TagTTL: DefaultTagTTL when zero.
	TagTTL time.Duration
	// Platform picks an image index's manifest; the node's when empty.
	Platform v1.Platform
	Logger   *slog.Logger
}

// Resolver resolves references into trees.
type Resolver struct {
	opts  Options
	log   *slog.Logger
	names []string

	mu     sync.Mutex
	tags   map[string]tagAnswer // "registry/repo:tag"
	asking map[string]*tagCall  // tags being asked now
	now    func() time.Time
}

type tagCall struct {
	done chan struct{}
	k    blob.Key
	body []byte
	err  error
}

type tagAnswer struct {
	k    blob.Key
	body []byte // the manifest, when at most maxKeptManifest bytes
	at   time.Time
}

// New returns a Resolver.
func New(opts Options) *Resolver {
	if opts.TagTTL <= 0 {
		opts.TagTTL = DefaultTagTTL
	}
	if opts.Platform.OS == "" {
		opts.Platform = v1.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	r := &Resolver{opts: opts, log: opts.Logger.With("component", "artifact"), tags: map[string]tagAnswer{}, asking: map[string]*tagCall{}, now: time.Now}
	for name := range opts.Registries {
		r.names = append(r.names, name)
	}
	sort.Strings(r.names)
	return r
}

// Registries lists the registries a reference may name, sorted.
func (r *Resolver) Registries() []string { return slices.Clone(r.names) }

// Allowed reports whether references may name registry.
func (r *Resolver) Allowed(registry string) bool {
	_, ok := r.opts.Registries[registry]
	return ok
}

var (
	repoComponent = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$`)
	tagPattern    = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$`)
)

// ValidRepoComponent reports whether s may be one component of a repository
// name (the OCI distribution grammar).
func ValidRepoComponent(s string) bool {
	return len(s) <= MaxRepositoryLen && repoComponent.MatchString(s)
}

// Reference is one path component that names a manifest: <name>:<tag> or
// <name>@sha256:<hex>.
type Reference struct {
	Name   string
	Tag    string
	Digest blob.Key
}

// IsReference reports whether a path component is meant as a reference
// rather than a namespace.
func IsReference(component string) bool { return strings.ContainsAny(component, ":@") }

// ParseReference parses a reference component.
func ParseReference(component string) (Reference, error) {
	if name, d, ok := strings.Cut(component, "@"); ok {
		k, err := blob.ParseDigest(d)
		if err != nil || !k.Verifiable() {
			return Reference{}, fmt.Errorf("reference %q: digest must be sha256:<64 hex>", trunc(component))
		}
		if !ValidRepoComponent(name) {
			return Reference{}, fmt.Errorf("reference %q: %q is not a repository name", trunc(component), trunc(name))
		}
		return Reference{Name: name, Digest: k}, nil
	}
	name, tag, _ := strings.Cut(component, ":")
	if !ValidRepoComponent(name) {
		return Reference{}, fmt.Errorf("reference %q: %q is not a repository name", trunc(component), trunc(name))
	}
	if !tagPattern.MatchString(tag) {
		return Reference{}, fmt.Errorf("reference %q: %q is not a tag", trunc(component), trunc(tag))
	}
	return Reference{Name: name, Tag: tag}, nil
}

func trunc(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}

// Resolve resolves the reference ref under namespace (a repository prefix,
// possibly empty) of registry into its tree. Errors wrap blob.ErrNotFound
// (nothing there, or not allowed) or ErrDenied.
func (r *Resolver) Resolve(ctx context.Context, registry, namespace string, ref Reference) (Tree, error) {
	base, ok := r.opts.Registries[registry]
	if !ok {
		return Tree{}, fmt.Errorf("registry %s is not in --registries: %w", registry, blob.ErrNotFound)
	}
	repo := ref.Name
	if namespace != "" {
		repo = namespace + "/" + ref.Name
	}
	if len(repo) > MaxRepositoryLen {
		return Tree{}, fmt.Errorf("repository name of %d bytes, over %d: %w", len(repo), MaxRepositoryLen, blob.ErrNotFound)
	}
	k := ref.Digest
	var body []byte
	if k == "" {
		var err error
		if k, body, err = r.resolveTag(ctx, registry, base, repo, ref.Tag); err != nil {
			return Tree{}, err
		}
	}
	if body == nil {
		var err error
		if body, err = r.readManifest(ctx, base, repo, k); err != nil {
			return Tree{}, err
		}
	}
	m, err := r.pickManifest(ctx, base, repo, k, body)
	if err != nil {
		return Tree{}, err
	}
	return r.tree(base, repo, m), nil
}

// manifestAt is a manifest and its digest and size.
type manifestAt struct {
	k    blob.Key
	size int64
	m    *v1.Manifest
}

// pickManifest returns the image manifest body names: itself, or the
// entry of an index for the node's platform.
func (r *Resolver) pickManifest(ctx context.Context, base, repo string, k blob.Key, body []byte) (manifestAt, error) {
	var probe struct {
		Manifests json.RawMessage `json:"manifests"`
		Layers    json.RawMessage `json:"layers"`
	}
	if err := json.Unmarshal(body, &probe); err != nil {
		return manifestAt{}, fmt.Errorf("%s is not a manifest (%v): %w", k, err, blob.ErrNotFound)
	}
	if probe.Manifests == nil {
		m, err := v1.ParseManifest(strings.NewReader(string(body)))
		if err != nil {
			return manifestAt{}, fmt.Errorf("%s is not an image manifest (%v): %w", k, err, blob.ErrNotFound)
		}
		return manifestAt{k: k, size: int64(len(body)), m: m}, nil
	}
	idx, err := v1.ParseIndexManifest(strings.NewReader(string(body)))
	if err != nil {
		return manifestAt{}, fmt.Errorf("%s is not an index (%v): %w", k, err, blob.ErrNotFound)
	}
	want := r.opts.Platform
	for _, d := range idx.Manifests {
		if d.Platform == nil || d.Platform.OS != want.OS || d.Platform.Architecture != want.Architecture ||
			(want.Variant != "" && d.Platform.Variant != "" && d.Platform.Variant != want.Variant) {
			continue
		}
		ck, err := blob.ParseDigest(d.Digest.String())
		if err != nil || !ck.Verifiable() {
			continue
		}
		cb, err := r.readManifest(ctx, base, repo, ck)
		if err != nil {
			return manifestAt{}, err
		}
		m, err := v1.ParseManifest(strings.NewReader(string(cb)))
		if err != nil {
			return manifestAt{}, fmt.Errorf("%s (for %s/%s in index %s) is not an image manifest: %w", ck, want.OS, want.Architecture, k, blob.ErrNotFound)
		}
		return manifestAt{k: ck, size: int64(len(cb)), m: m}, nil
	}
	return manifestAt{}, fmt.Errorf("index %s has no manifest for %s/%s: %w", k, want.OS, want.Architecture, blob.ErrNotFound)
}

// tree names a manifest's files: manifest.json, the config, and each layer
// by its title annotation when that is a safe, unique file name, else
// sha256-<hex>.
func (r *Resolver) tree(base, repo string, ma manifestAt) Tree {
	t := Tree{Manifest: ma.k}
	t.Files = append(t.Files, File{Name: ManifestName, Key: ma.k, Size: ma.size, Origin: r.origin(base, repo, "manifests", ma.k)})
	if ck, err := blob.ParseDigest(ma.m.Config.Digest.String()); err == nil && ck.Verifiable() && ma.m.Config.Size >= 0 {
		t.Files = append(t.Files, File{Name: ConfigName, Key: ck, Size: ma.m.Config.Size, Origin: r.origin(base, repo, "blobs", ck)})
	}
	titles := map[string]int{}
	for _, l := range ma.m.Layers {
		if title := l.Annotations[TitleAnnotation]; title != "" {
			titles[title]++
		}
	}
	seen := map[string]bool{ManifestName: true, ConfigName: true}
	for _, l := range ma.m.Layers {
		k, err := blob.ParseDigest(l.Digest.String())
		if err != nil || !k.Verifiable() || l.Size < 0 {
			t.Renamed = append(t.Renamed, fmt.Sprintf("a layer with digest %q left out (not sha256)", trunc(l.Digest.String())))
			continue
		}
		name := "sha256-" + k.Hex()
		if title := l.Annotations[TitleAnnotation]; title != "" {
			switch {
			case !safeName(title):
				t.Renamed = append(t.Renamed, fmt.Sprintf("%s: title %q is not a safe file name", name, trunc(title)))
			case titles[title] > 1:
				t.Renamed = append(t.Renamed, fmt.Sprintf("%s: title %q is shared by %d layers", name, trunc(title), titles[title]))
			case seen[title]:
				t.Renamed = append(t.Renamed, fmt.Sprintf("%s: title %q is a name of the tree's own", name, trunc(title)))
			default:
				name = title
			}
		}
		if seen[name] {
			continue // the same blob twice
		}
		seen[name] = true
		t.Files = append(t.Files, File{Name: name, Key: k, Size: l.Size, Origin: r.origin(base, repo, "blobs", k)})
	}
	sort.Slice(t.Files, func(i, j int) bool { return t.Files[i].Name < t.Files[j].Name })
	return t
}

// safeName reports whether a title may be a file name in the tree: one path
// component, printable, no NUL, not "." or "..".
func safeName(s string) bool {
	if s == "" || s == "." || s == ".." || len(s) > 255 || strings.ContainsAny(s, "/\x00") {
		return false
	}
	for _, c := range s {
		if c < 0x20 || c == 0x7f {
			return false
		}
	}
	return true
}

// origin is the registry as the source of one manifest or blob of repo.
func (r *Resolver) origin(base, repo, kind string, k blob.Key) blob.Source {
	if r.opts.Upstream == nil {
		return nil
	}
	u, err := url.Parse(base + "/v2/" + repo + "/" + kind + "/" + string(k))
	if err != nil {
		return nil
	}
	var hdr http.Header
	if kind == "manifests" {
		hdr = http.Header{"Accept": {manifestAccept}}
	}
	if r.opts.Auth != nil {
		return r.opts.Upstream.SourceWithAuth(u, hdr, nil, r.opts.Auth)
	}
	return r.opts.Upstream.Source(u, hdr, nil)
}

// readManifest reads a manifest by digest through the cache (this node,
// peers, then the registry) and checks it.
func (r *Resolver) readManifest(ctx context.Context, base, repo string, k blob.Key) ([]byte, error) {
	if r.opts.Cache == nil {
		return nil, fmt.Errorf("%s: no cache: %w", k, blob.ErrNotFound)
	}
	h := r.opts.Cache.Open(k, r.opts.Plan.Plan(k, r.origin(base, repo, "manifests", k)))
	defer h.Close()
	size, err := h.Size(ctx)
	if err != nil {
		return nil, denied(fmt.Errorf("manifest %s: %w", k, err))
	}
	if size > MaxManifestBytes {
		return nil, fmt.Errorf("%s is %d bytes, over the %d a manifest may have: %w", k, size, MaxManifestBytes, blob.ErrNotFound)
	}
	body := make([]byte, size)
	if n, err := h.ReadAt(ctx, body, 0); int64(n) != size || (err != nil && err != io.EOF) {
		return nil, denied(fmt.Errorf("read manifest %s: %d of %d bytes: %w", k, n, size, err))
	}
	if sum := sha256.Sum256(body); "sha256:"+hex.EncodeToString(sum[:]) != string(k) {
		return nil, fmt.Errorf("%s: content does not match its digest: %w", k, blob.ErrNotFound)
	}
	return body, nil
}

// denied marks an error that carries a registry's 401 or 403 as ErrDenied.
func denied(err error) error {
	var se *upstream.StatusError
	if errors.As(err, &se) && (se.Code == http.StatusUnauthorized || se.Code == http.StatusForbidden) {
		return fmt.Errorf("%w (%s): %w", ErrDenied, se.Status, err)
	}
	return err
}

// resolveTag asks the registry which digest a tag names, at most once per
// TagTTL per tag; body is the manifest when that answer brought it (nil:
// read it by digest).
func (r *Resolver) resolveTag(ctx context.Context, registry, base, repo, tag string) (blob.Key, []byte, error) {
	key := registry + "/" + repo + ":" + tag
	r.mu.Lock()
	if a, ok := r.tags[key]; ok && r.now().Sub(a.at) < r.opts.TagTTL {
		r.mu.Unlock()
		return a.k, a.body, nil
	}
	// One request per tag at a time: a burst of lookups of a new tag (every
	// process of a pod starting) waits for the first one's answer.
	if c, ok := r.asking[key]; ok {
		r.mu.Unlock()
		select {
		case <-c.done:
			return c.k, c.body, c.err
		case <-ctx.Done():
			return "", nil, fmt.Errorf("tag %s:%s: %w (%w)", repo, tag, blob.ErrNotFound, ctx.Err())
		}
	}
	c := &tagCall{done: make(chan struct{})}
	r.asking[key] = c
	r.mu.Unlock()
	c.k, c.body, c.err = r.askTag(ctx, base, repo, tag)
	if len(c.body) > maxKeptManifest {
		c.body = nil // read by digest through the cache when needed
	}
	r.mu.Lock()
	delete(r.asking, key)
	if c.err == nil {
		if len(r.tags) >= maxTags {
			for old, a := range r.tags {
				if r.now().Sub(a.at) >= r.opts.TagTTL || len(r.tags) >= maxTags {
					delete(r.tags, old)
				}
			}
		}
		r.tags[key] = tagAnswer{k: c.k, body: c.body, at: r.now()}
	}
	r.mu.Unlock()
	close(c.done)
	return c.k, c.body, c.err
}

func (r *Resolver) askTag(ctx context.Context, base, repo, tag string) (blob.Key, []byte, error) {
	if r.opts.Upstream == nil {
		return "", nil, fmt.Errorf("tag %s:%s: no registry client: %w", repo, tag, blob.ErrNotFound)
	}
	u := base + "/v2/" + repo + "/manifests/" + tag
	pu, err := url.Parse(u)
	if err != nil {
		return "", nil, fmt.Errorf("tag %s:%s: %w", repo, tag, blob.ErrNotFound)
	}
	do := func(method, authorization string) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, method, u, nil)
		if err != nil {
			return nil, fmt.Errorf("tag %s:%s: %w", repo, tag, blob.ErrNotFound)
		}
		req.Header.Set("Accept", manifestAccept)
		req.Header.Set(upstream.LoopHeader, "1")
		if authorization != "" {
			req.Header.Set("Authorization", authorization)
		}
		resp, err := r.opts.Upstream.HTTPClient().Do(req)
		if err != nil {
			return nil, fmt.Errorf("tag %s:%s: %s: %w", repo, tag, upstream.RedactText(err.Error()), blob.ErrNotFound)
		}
		return resp, nil
	}
	ask := func(method string) (*http.Response, error) {
		var a string
		if r.opts.Auth != nil {
			if a, err = r.opts.Auth.Authorization(ctx, pu, nil); err != nil {
				return nil, fmt.Errorf("%w: tag %s:%s: %w", ErrDenied, repo, tag, err)
			}
		}
		resp, err := do(method, a)
		if err == nil && resp.StatusCode == http.StatusUnauthorized && r.opts.Auth != nil {
			resp.Body.Close()
			if a, err = r.opts.Auth.Authorization(ctx, pu, resp.Header); err != nil {
				return nil, fmt.Errorf("%w: tag %s:%s: %w", ErrDenied, repo, tag, err)
			}
			resp, err = do(method, a)
		}
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			err := fmt.Errorf("tag %s:%s: %w", repo, tag, &upstream.StatusError{Code: resp.StatusCode, Status: resp.Status, Header: resp.Header})
			if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
				return nil, denied(err)
			}
			return nil, fmt.Errorf("%w: %w", err, blob.ErrNotFound)
		}
		return resp, nil
	}
	// GET, not HEAD: the manifest comes with the answer, so a cold lookup
	// costs one request instead of a HEAD and a manifest fetch.
	resp, err := ask(http.MethodGet)
	if err != nil {
		return "", nil, err
	}
	defer resp.Body.Close()
	m, err := io.ReadAll(io.LimitReader(resp.Body, MaxManifestBytes+1))
	if err != nil {
		return "", nil, fmt.Errorf("tag %s:%s: reading the manifest: %w", repo, tag, blob.ErrNotFound)
	}
	if len(m) > MaxManifestBytes {
		return "", nil, fmt.Errorf("tag %s:%s: manifest over %d bytes: %w", repo, tag, MaxManifestBytes, blob.ErrNotFound)
	}
	sum := sha256.Sum256(m)
	k := blob.Key("sha256:" + hex.EncodeToString(sum[:]))
	if d := resp.Header.Get("Docker-Content-Digest"); d != "" && d != string(k) {
		return "", nil, fmt.Errorf("tag %s:%s: the registry names %s but sent a manifest hashing to %s: %w", repo, tag, upstream.Bound(d), k, blob.ErrNotFound)
	}
	return k, m, nil
}

// Target is a whole reference: registry, namespace and the last component.
type Target struct {
	Registry  string
	Namespace string
	Ref       Reference
}

func (t Target) String() string {
	s := t.Registry + "/"
	if t.Namespace != "" {
		s += t.Namespace + "/"
	}
	if t.Ref.Digest != "" {
		return s + t.Ref.Name + "@" + string(t.Ref.Digest)
	}
	return s + t.Ref.Name + ":" + t.Ref.Tag
}

// ParseTarget parses "<registry>/<repository>:<tag>" or
// "<registry>/<repository>@sha256:<hex>" (the registry as in an image
// reference, host[:port]; no default registry, no default tag).
func ParseTarget(s string) (Target, error) {
	registry, rest, ok := strings.Cut(s, "/")
	if !ok || registry == "" || rest == "" {
		return Target{}, fmt.Errorf("reference %q: want <registry>/<repository>:<tag> or @sha256:<hex>", trunc(s))
	}
	ns, last := "", rest
	if i := strings.LastIndex(rest, "/"); i >= 0 && !strings.Contains(rest[:i], "@") {
		ns, last = rest[:i], rest[i+1:]
	}
	for _, c := range strings.Split(ns, "/") {
		if ns != "" && !ValidRepoComponent(c) {
			return Target{}, fmt.Errorf("reference %q: %q is not a repository name component", trunc(s), trunc(c))
		}
	}
	if !IsReference(last) {
		return Target{}, fmt.Errorf("reference %q: name a tag (:<tag>) or a digest (@sha256:<hex>)", trunc(s))
	}
	ref, err := ParseReference(last)
	if err != nil {
		return Target{}, err
	}
	return Target{Registry: registry, Namespace: ns, Ref: ref}, nil
}
