package httpmirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"regexp"
	"strings"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/transfer"
	"github.com/peerd-project/peerd/upstream"
	"github.com/prometheus/client_golang/prometheus"
)

// The OCI /v2/ mirror containerd uses through hosts.toml:
//
//	GET|HEAD /v2/                                   200
//	GET|HEAD /v2/<name>/manifests/<digest|tag>?ns=<registry>
//	GET|HEAD /v2/<name>/blobs/<digest>?ns=<registry>
//
// A blob or manifest by digest is served from the node's own containerd
// content store, else through the cache from peers, else (pull-through, for
// the registries in OCIConfig.PullThrough) from the registry ?ns= names,
// streamed while the cache fills and shared with peers pulling it at the
// same time; else 404 with an OCI error body, on which containerd moves on
// to the next host (in the end the registry).
//
// A manifest by tag is resolved only from the node's own image store by
// default: tags are mutable, and a peer's copy of a tag may be older than
// the registry's. ResolveTag lets operators opt into peer answers.

// LocalOnlyHeader marks a request one peerd node sends another: it is
// answered from that node's own content only (its containerd store and
// verified cache), never by asking further peers, so requests cannot bounce
// around the cluster.
const LocalOnlyHeader = "X-Peerd-Local-Only"

// maxManifestBytes bounds a manifest read into memory (the distribution
// registry's own limit).
const maxManifestBytes = 4 << 20

// OCIBlob is an open blob of the node's own image store.
type OCIBlob interface {
	io.ReaderAt
	io.Closer
	Size() int64
	// MediaType is the media type the image store knows for the blob, or "".
	MediaType() string
}

// OCIStore is the node's own image store (containerd's) as the mirror sees it.
type OCIStore interface {
	// OpenBlob opens k, or returns an error wrapping blob.ErrNotFound quickly.
	OpenBlob(ctx context.Context, k blob.Key) (OCIBlob, error)
	// Resolve returns the digest an image name ("<registry>/<repo>:<tag>")
	// points to, or an error wrapping blob.ErrNotFound.
	Resolve(ctx context.Context, name string) (blob.Key, error)
}

// OCIConfig wires the /v2/ handler.
type OCIConfig struct {
	// Local is the node's containerd store; nil when containerd is off.
	Local OCIStore
	// Cache serves what Local does not hold, filled under Plan (nil: the
	// registry's origin alone).
	Cache *cache.Cache
	Plan  cache.Planner
	// Registries whose tags may be resolved (hosts as containerd sends them
	// in ?ns=, e.g. "docker.io"). A tag of any other registry is never served.
	Registries []string
	// ResolveTag, when set, asks peers for a tag the local store does not
	// know (the --resolve-tags opt-in).
	ResolveTag func(ctx context.Context, registry, repo, tag string) (blob.Key, error)
	// PullThrough maps a registry as containerd names it in ?ns= to the
	// base URL a blob or manifest by digest is fetched from when neither
	// containerd nor the cache nor a peer has it ("docker.io" →
	// "https://registry-1.docker.io"). Only these registries are contacted;
	// nil turns pull-through off (misses are 404s).
	PullThrough map[string]string
	// Upstream fetches from PullThrough registries (needed with it).
	Upstream *upstream.Client
	// Auth, when set, answers a registry's challenge for a request that
	// came without the client's own Authorization.
	Auth upstream.Authorizer
	// ExpectPeers, when set, is told the blobs an image manifest names
	// when that manifest came from peers: their holders are likely peers
	// too, so a swarm pull of them need not start at the origin.
	ExpectPeers func([]blob.Key)
	// Transfers, when set, records every blob GET.
	Transfers       *transfer.Log
	Prefetch        bool
	PrefetchWorkers int
	Logger          *slog.Logger
	Registry        prometheus.Registerer
}

type ociHandler struct {
	cfg        OCIConfig
	log        *slog.Logger
	srv        *Server // for serveHandle
	registries map[string]bool
	served     *prometheus.CounterVec
	peerShare  prometheus.Histogram
	// byPathName maps MirrorPathName of each --registries entry back to it.
	byPathName map[string]string
}

// NewOCI returns the /v2/ handler.
func NewOCI(cfg OCIConfig) http.Handler {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.PrefetchWorkers <= 0 {
		cfg.PrefetchWorkers = 4
	}
	log := cfg.Logger.With("component", "oci")
	h := &ociHandler{
		cfg:        cfg,
		log:        log,
		srv:        &Server{cfg: Config{Prefetch: cfg.Prefetch, PrefetchWorkers: cfg.PrefetchWorkers}, log: log},
		registries: map[string]bool{},
	}
	h.byPathName = map[string]string{}
	for _, r := range cfg.Registries {
		h.registries[strings.ToLower(r)] = true
		h.byPathName[MirrorPathName(r)] = strings.ToLower(r)
	}
	h.served = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "peerd_oci_responses_total",
		Help: "OCI mirror answers by kind (manifest, blob) and where the content came from (containerd, cache: local cache or peers, none: 404, invalid: 4xx).",
	}, []string{"kind", "from"})
	h.peerShare = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "peerd_oci_blob_peer_share",
		Help:    "Share (0 to 1) of each completed /v2/ blob GET's bytes that came from peers during the request; bytes the node held before count as not from peers.",
		Buckets: []float64{0, 0.1, 0.25, 0.5, 0.75, 0.9, 1},
	})
	if cfg.Registry != nil {
		cfg.Registry.MustRegister(h.served, h.peerShare)
	}
	return h
}

// recorder is serveHandle's done for a /v2/ blob GET: the transfer log and
// the share of the pull that peers served.
func (h *ociHandler) recorder(r *http.Request) func(transfer.Record) {
	what := r.URL.Query().Get("ns")
	if req, code, _ := parseOCIPath(r.URL.Path); code == "" {
		what += "/" + req.name
	}
	return func(t transfer.Record) {
		t.Face, t.What = transfer.FaceOCI, upstream.Bound(what)
		h.cfg.Transfers.Add(t)
		if tot := t.Bytes.Total(); t.Result == "ok" && tot > 0 {
			h.peerShare.Observe(float64(t.Bytes.Peers) / float64(tot))
		}
	}
}

var (
	// Repository name components, as the distribution spec defines them.
	nameRE = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)
	tagRE  = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
)

// ociRequest is a parsed /v2/<name>/<kind>/<ref> path.
type ociRequest struct {
	name, kind, ref string
	key             blob.Key // set when ref is a digest
}

// parseOCIPath splits the path after /v2/. It returns an OCI error code
// and message for bad input.
func parseOCIPath(p string) (ociRequest, string, string) {
	rest := strings.TrimPrefix(p, "/v2/")
	i := strings.LastIndexByte(rest, '/')
	if i < 0 {
		return ociRequest{}, "NAME_UNKNOWN", "not an OCI distribution path"
	}
	ref := rest[i+1:]
	j := strings.LastIndexByte(rest[:i], '/')
	if j < 0 {
		return ociRequest{}, "NAME_UNKNOWN", "not an OCI distribution path"
	}
	req := ociRequest{name: rest[:j], kind: rest[j+1 : i], ref: ref}
	if req.kind != "manifests" && req.kind != "blobs" {
		return ociRequest{}, "UNSUPPORTED", fmt.Sprintf("only manifests and blobs are served, not %q", req.kind)
	}
	if len(req.name) > 255 || !nameRE.MatchString(req.name) {
		return ociRequest{}, "NAME_INVALID", fmt.Sprintf("invalid repository name %q", trunc(req.name))
	}
	if strings.Contains(ref, ":") {
		k, err := blob.ParseDigest(ref)
		if err != nil {
			return ociRequest{}, "DIGEST_INVALID", err.Error()
		}
		req.key = k
		return req, "", ""
	}
	if req.kind == "blobs" {
		return ociRequest{}, "DIGEST_INVALID", fmt.Sprintf("blobs are named by digest, not %q", trunc(ref))
	}
	if !tagRE.MatchString(ref) {
		return ociRequest{}, "TAG_INVALID", fmt.Sprintf("invalid tag %q", trunc(ref))
	}
	return req, "", ""
}

func trunc(s string) string {
	if len(s) > 100 {
		return s[:100] + "..."
	}
	return s
}

func (h *ociHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		ociError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "this mirror is read-only: only GET and HEAD")
		return
	}
	if r.URL.Path == "/v2" || r.URL.Path == "/v2/" {
		w.Header().Set("Docker-Distribution-Api-Version", "registry/2.0")
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "2")
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodGet {
			io.WriteString(w, "{}")
		}
		return
	}
	if r.URL.RawPath != "" {
		// Names, tags and digests never need escaping.
		h.bad(w, r, "", "NAME_INVALID", "escaped characters in path")
		return
	}
	reg, rest, viaPath := mirrorPath(r)
	if viaPath {
		// containers-registries.conf mirrors (CRI-O, Podman) name the
		// registry in the path instead of ?ns=: the same request then.
		name := reg
		if reg = h.byPathName[reg]; reg == "" {
			ociError(w, http.StatusNotFound, "NAME_UNKNOWN", fmt.Sprintf("registry %q is not one this mirror serves (--registries)", trunc(name)))
			return
		}
		r2 := r.Clone(r.Context())
		r2.URL.Path = "/v2/" + rest
		q := r2.URL.Query()
		q.Set("ns", reg)
		r2.URL.RawQuery = q.Encode()
		r = r2
	}
	if r.Header.Get(upstream.LoopHeader) != "" {
		// A pull-through registry redirected peerd back to a peerd mirror.
		ociError(w, http.StatusLoopDetected, "UNSUPPORTED", "redirect loop: a registry redirected peerd back to a peerd mirror")
		return
	}
	req, code, msg := parseOCIPath(r.URL.Path)
	if code != "" {
		h.bad(w, r, req.kind, code, msg)
		return
	}
	registry := strings.ToLower(r.URL.Query().Get("ns"))
	localOnly := r.Header.Get(LocalOnlyHeader) == "1"
	if req.kind == "blobs" {
		h.serveBlob(w, r, req.key, localOnly)
		return
	}
	if req.key == "" {
		k, err := h.resolveTag(r.Context(), registry, req.name, req.ref, localOnly)
		if err != nil && viaPath && !localOnly && h.registries[registry] {
			k, err = h.resolveAtRegistry(r, registry, req.name, req.ref)
		}
		if err != nil {
			h.missOrChallenge(w, "manifest", "MANIFEST_UNKNOWN", err)
			return
		}
		req.key = k
	}
	h.serveManifest(w, r, req.key, localOnly)
}

func (h *ociHandler) bad(w http.ResponseWriter, r *http.Request, kind, code, msg string) {
	if kind == "" {
		kind = "other"
	}
	h.served.WithLabelValues(strings.TrimSuffix(kind, "s"), "invalid").Inc()
	h.log.Info("bad OCI request", "path", trunc(r.URL.Path), "code", code, "err", msg)
	ociError(w, http.StatusBadRequest, code, msg)
}

// miss answers 404 so containerd tries its next host.
func (h *ociHandler) miss(w http.ResponseWriter, kind, code string, err error) {
	h.served.WithLabelValues(kind, "none").Inc()
	if !errors.Is(err, blob.ErrNotFound) && !errors.Is(err, context.Canceled) {
		h.log.Warn("OCI mirror could not serve; the client falls back to its next host", "kind", kind, "err", err)
	}
	ociError(w, http.StatusNotFound, code, err.Error())
}

// manifestAccept lists every manifest type, so a registry returns a
// manifest by digest as stored rather than converting it.
const manifestAccept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, " +
	"application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, " +
	"application/vnd.docker.distribution.manifest.v1+prettyjws, application/vnd.docker.distribution.manifest.v1+json"

// origin returns the registry source a miss of k is pulled through from: the
// registry ?ns= names, if pull-through is on for it. containerd's
// Authorization goes to that registry alone (the cache never passes a
// source's headers to peers, and nothing logs them).
func (h *ociHandler) origin(r *http.Request, k blob.Key, kind string, hdr http.Header) blob.Source {
	if h.cfg.PullThrough == nil || h.cfg.Upstream == nil {
		return nil
	}
	base, ok := h.cfg.PullThrough[strings.ToLower(r.URL.Query().Get("ns"))]
	if !ok {
		return nil
	}
	req, code, _ := parseOCIPath(r.URL.Path)
	if code != "" {
		return nil
	}
	u, err := url.Parse(base + "/v2/" + req.name + "/" + kind + "/" + string(k))
	if err != nil {
		return nil
	}
	if a := r.Header.Get("Authorization"); a != "" {
		if hdr == nil {
			hdr = http.Header{}
		}
		hdr.Set("Authorization", a)
	} else if h.cfg.Auth != nil {
		return h.cfg.Upstream.SourceWithAuth(u, hdr, nil, h.cfg.Auth)
	}
	// Registries redirect to storage hosts nobody lists: a redirect is held
	// to the forbidden-address, loop and hop rules only.
	return h.cfg.Upstream.Source(u, hdr, nil)
}

// missOrChallenge relays a registry's 401 and its WWW-Authenticate
// challenge, so containerd fetches a token as it would from the registry and
// asks again with it; any other failure is a 404, on which containerd goes
// to its next host (in the end the registry itself).
func (h *ociHandler) missOrChallenge(w http.ResponseWriter, kind, code string, err error) {
	var se *upstream.StatusError
	if errors.As(err, &se) && se.Code == http.StatusUnauthorized {
		if vs := se.Header.Values("Www-Authenticate"); len(vs) > 0 {
			for _, v := range vs {
				w.Header().Add("Www-Authenticate", v)
			}
			h.served.WithLabelValues(kind, "challenge").Inc()
			ociError(w, http.StatusUnauthorized, "UNAUTHORIZED", "the registry asks for credentials")
			return
		}
	}
	h.miss(w, kind, code, err)
}

func (h *ociHandler) resolveTag(ctx context.Context, registry, repo, tag string, localOnly bool) (blob.Key, error) {
	if registry == "" {
		return "", fmt.Errorf("tag %s:%s without ?ns=<registry>: %w", repo, tag, blob.ErrNotFound)
	}
	if !h.registries[registry] {
		return "", fmt.Errorf("tags of registry %s are not served (not in --registries): %w", registry, blob.ErrNotFound)
	}
	name := registry + "/" + repo + ":" + tag
	var err error = fmt.Errorf("image %s: %w", name, blob.ErrNotFound)
	if h.cfg.Local != nil {
		var k blob.Key
		if k, err = h.cfg.Local.Resolve(ctx, name); err == nil {
			return k, nil
		}
	}
	if h.cfg.ResolveTag != nil && !localOnly {
		return h.cfg.ResolveTag(ctx, registry, repo, tag)
	}
	return "", err
}

// ctWriter sets the stored media type on a successful answer that
// serveHandle labelled application/octet-stream.
var _ io.ReaderFrom = (*ctWriter)(nil)

type ctWriter struct {
	http.ResponseWriter
	ct   string
	sent bool
}

func (w *ctWriter) WriteHeader(code int) {
	if !w.sent {
		w.sent = true
		if code < 300 && w.ct != "" {
			w.Header().Set("Content-Type", w.ct)
		}
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *ctWriter) Write(p []byte) (int, error) {
	if !w.sent {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(p)
}

func (w *ctWriter) ReadFrom(r io.Reader) (int64, error) {
	if !w.sent {
		w.WriteHeader(http.StatusOK)
	}
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		return rf.ReadFrom(r) // keeps sendfile for cached files
	}
	return io.Copy(struct{ io.Writer }{w.ResponseWriter}, r)
}

func (h *ociHandler) serveBlob(w http.ResponseWriter, r *http.Request, k blob.Key, localOnly bool) {
	ctx := r.Context()
	if h.cfg.Local != nil {
		if b, err := h.cfg.Local.OpenBlob(ctx, k); err == nil {
			defer b.Close()
			h.served.WithLabelValues("blob", "containerd").Inc()
			h.srv.serveHandle(&ctWriter{ResponseWriter: w, ct: b.MediaType()}, r, &storeReader{b: b}, k, h.recorder(r))
			return
		}
	}
	if h.cfg.Cache == nil {
		h.miss(w, "blob", "BLOB_UNKNOWN", fmt.Errorf("%s: %w", k, blob.ErrNotFound))
		return
	}
	var br blobReader
	if localOnly {
		lr, size, err := h.cfg.Cache.OpenLocal(k, 0, -1)
		if err != nil {
			h.miss(w, "blob", "BLOB_UNKNOWN", err)
			return
		}
		lr.Close()
		br = &cacheLocal{c: h.cfg.Cache, k: k, size: size}
	} else {
		hd := h.cfg.Cache.Open(k, h.cfg.Plan.Plan(k, h.origin(r, k, "blobs", nil)))
		defer hd.Close()
		// Learn the size first: a miss must become a 404 with an OCI body
		// (or the registry's challenge, see missOrChallenge).
		if _, err := hd.Size(ctx); err != nil {
			h.missOrChallenge(w, "blob", "BLOB_UNKNOWN", err)
			return
		}
		br = hd
	}
	h.served.WithLabelValues("blob", "cache").Inc()
	h.srv.serveHandle(w, r, br, k, h.recorder(r))
}
