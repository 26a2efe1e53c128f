package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/containerd"
	ctrd "github.com/peerd-project/peerd/containerd"
	"github.com/peerd-project/peerd/httpmirror"
	"github.com/peerd-project/peerd/p2p"
	"github.com/prometheus/client_golang/prometheus"
)

// containerdConfig holds the flags of the containerd integration and the OCI mirror.
type containerdConfig struct {
	Socket      string
	Namespace   string
	Registries  registryList
	ResolveTags bool
	HostsDir    string
	ConfigFile  string
	Resync      time.Duration
	PullThrough bool
	AuthFile    string
}

func registerContainerdFlags(fs *flag.FlagSet, c *containerdConfig) {
	fs.StringVar(&c.Socket, "containerd-socket", "/run/containerd/containerd.sock", "containerd's gRPC socket; peerd advertises the blobs it holds and serves them to peers and to the /v2/ mirror (--containerd-socket= turns this off)")
	fs.StringVar(&c.Namespace, "containerd-namespace", "k8s.io", "containerd namespace whose images are shared")
	fs.Var(&c.Registries, "registries", "registries the /v2/ mirror resolves tags for and whose hosts.toml peerd checks, e.g. docker.io,ghcr.io (repeatable, comma-separated); tags of other registries are never served")
	fs.BoolVar(&c.ResolveTags, "resolve-tags", false, "resolve a tag the local image store does not hold through peers, and advertise and answer this node's own tags of --registries (tags are mutable: a peer's image for a tag may be older than the registry's; use with immutable tags; every node that should answer needs it too)")
	fs.StringVar(&c.HostsDir, "containerd-hosts-dir", "/etc/containerd/certs.d", "containerd's hosts.toml folder that 'peerd containerd-config' writes; checked at start")
	fs.StringVar(&c.ConfigFile, "containerd-config", "/etc/containerd/config.toml", "containerd's config file, read to check that containerd consults --containerd-hosts-dir")
	fs.BoolVar(&c.PullThrough, "pull-through", true, "on a /v2/ miss, fetch the blob or manifest by digest from the registry ?ns= names (only --registries; https unless listed as http://), stream it to containerd while caching it, and share it with peers pulling it at the same time; off: misses are 404s and containerd goes to the registry itself")
	fs.StringVar(&c.AuthFile, "registry-auth-file", "", "a Docker-style config.json (\"auths\" by registry) whose credentials answer --registries' challenges for the mount's oci folder, peerd warm and /v2/ pull-through when the client sent none; sent to that registry and its token service only, never to peers, never logged")
	fs.DurationVar(&c.Resync, "containerd-resync", time.Minute, "how often containerd's whole content store is walked again (1.x sends no event when a blob is committed)")
}

func (c *containerdConfig) validate() error {
	var errs []error
	if c.Socket != "" && c.Namespace == "" {
		errs = append(errs, errors.New("--containerd-namespace must not be empty"))
	}
	for _, r := range c.Registries.items {
		if _, err := ctrd.ParseRegistry(r); err != nil {
			errs = append(errs, fmt.Errorf("--registries: %w", err))
		} else if r == "_default" {
			errs = append(errs, errors.New("--registries: _default names no registry here; list the registries the mirror serves"))
		}
	}
	if c.Resync < time.Second {
		errs = append(errs, fmt.Errorf("--containerd-resync %v: want at least 1s", c.Resync))
	}
	return errors.Join(errs...)
}

// registryHosts are the ?ns= values the mirror accepts tags for.
func (c *containerdConfig) registryHosts() []string {
	var out []string
	for _, r := range c.Registries.items {
		if reg, err := ctrd.ParseRegistry(r); err == nil {
			out = append(out, reg.Host)
		}
	}
	return out
}

// pullThroughServers maps each --registries host to the base URL its API is
// fetched from. An entry with an explicit scheme wins over one without, so
// "host" and "http://host" together mean plain HTTP (test registries).
func (c *containerdConfig) pullThroughServers() map[string]string {
	out := map[string]string{}
	explicit := map[string]bool{}
	for _, r := range c.Registries.items {
		reg, err := ctrd.ParseRegistry(r)
		if err != nil {
			continue
		}
		has := strings.Contains(r, "://")
		if _, ok := out[reg.Host]; !ok || (has && !explicit[reg.Host]) {
			out[reg.Host] = reg.Server
			explicit[reg.Host] = has
		}
	}
	return out
}

// startContainerd connects to containerd, starts the content-store subscriber and sets a.oci.
func startContainerd(ctx context.Context, a *app) error {
	c := &a.cfg.Containerd
	if err := c.validate(); err != nil {
		return err
	}
	oci := httpmirror.OCIConfig{
		Cache:           a.cache,
		Plan:            a.planner(faceOCI),
		Transfers:       a.transfers,
		Registries:      c.registryHosts(),
		Prefetch:        a.cfg.Prefetch,
		PrefetchWorkers: a.cfg.PrefetchWorkers,
		Logger:          a.log,
		Registry:        a.reg,
	}
	if a.peers != nil {
		oci.ExpectPeers = a.peers.ExpectHeld
	}
	if c.PullThrough && len(oci.Registries) > 0 {
		oci.PullThrough = c.pullThroughServers()
		oci.Upstream = a.upstream
		if a.auth != nil {
			oci.Auth = a.auth
		}
		a.log.Info("/v2/ pull-through on", "registries", c.Registries.String())
	}
	if len(oci.Registries) == 0 {
		a.log.Info("no --registries: the /v2/ mirror serves manifests by digest only; containerd resolves tags at the registry")
	}
	if c.ResolveTags && len(oci.Registries) == 0 {
		return errors.New("--resolve-tags needs --registries: tags of unlisted registries are never resolved")
	}
	if c.Socket == "" {
		a.log.Info("containerd integration off (--containerd-socket is empty); /v2/ serves from the cache and peers only")
		if err := enableTagResolution(ctx, a, &oci, nil); err != nil {
			return err
		}
		a.oci = httpmirror.NewOCI(oci)
		return nil
	}

	configured := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "peerd_containerd_mirror_configured",
		Help: "1 if containerd's config and hosts.toml files send the --registries to this node's mirror, 0 if not (see the warning in the log), -1 before the check ran.",
	})
	configured.Set(-1)
	a.reg.MustRegister(configured)
	mirror := "http://" + mirrorHostPort(a.cfg.HTTPAddr)

	var lastVerdict string // touched only on the subscriber's goroutine
	// The node advertises a blob while the cache or containerd holds it.
	var announce blob.Announcer
	if a.p2p != nil {
		announce = a.p2p.Announcer("containerd")
	}
	store := ctrd.New(ctrd.Options{
		Namespace:  c.Namespace,
		Connect:    ctrd.DialSocket(c.Socket, c.Namespace),
		Announcer:  announce,
		Resync:     c.Resync,
		Socket:     c.Socket,
		Logger:     a.log,
		Registerer: a.reg,
		// Re-checked at every resync, so fixing the config needs no restart;
		// logged when the verdict changes.
		OnSync: func(version string) {
			if len(c.Registries.items) == 0 {
				return
			}
			err := ctrd.CheckMirror(c.ConfigFile, majorVersion(version), c.HostsDir, c.Registries.items, mirror)
			verdict := "ok"
			if err != nil {
				verdict = err.Error()
			}
			a.mirror.Store(&verdict)
			if verdict == lastVerdict {
				return
			}
			lastVerdict = verdict
			if err != nil {
				configured.Set(0)
				a.log.Warn("containerd may not use this node's mirror: pulls bypass peerd", "containerd", version, "problem", err,
					"fix", "run 'peerd containerd-config --hosts-dir "+c.HostsDir+" --registries "+c.Registries.String()+" --mirror "+mirror+"' and set containerd's registry config_path to that folder")
				return
			}
			configured.Set(1)
			a.log.Info("containerd consults this node's mirror", "containerd", version, "hosts-dir", c.HostsDir, "registries", c.Registries.String())
		},
	})
	if a.p2p != nil {
		// Peers read containerd's blobs straight from its content store.
		a.p2p.AddStore(p2p.NamedStore("containerd", store))
	}
	// Containerd's role per face is plan's: a Local source of the faces
	// that read through the cache, read in place by /v2/ and the peer server.
	a.containerd = store.Source()
	a.ctrdStore = store
	// Not ready while containerd is not reached: a wrong --containerd-socket
	// must show on the probe, not only in the log. The other faces serve.
	a.readyChecks = append(a.readyChecks, func() error {
		if store.Connected() {
			return nil
		}
		why := store.LastError()
		if why == "" {
			why = "not connected yet"
		}
		return fmt.Errorf("containerd not reached at --containerd-socket %s: %s (start containerd, pass the socket it listens on, or --containerd-socket= to run without it)", c.Socket, why)
	})
	oci.Local = ociStore{store}
	if err := enableTagResolution(ctx, a, &oci, store); err != nil {
		return err
	}
	a.oci = httpmirror.NewOCI(oci)
	a.blobCatalogs = append(a.blobCatalogs, catalog{store})

	a.spawn(ctx, "containerd subscriber", func(ctx context.Context) { store.Run(ctx) })
	return nil
}

// mirrorHostPort is how the local containerd reaches --http-addr.
func mirrorHostPort(addr string) string {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if ip := net.ParseIP(h); h == "" || (ip != nil && ip.IsUnspecified()) {
		h = "127.0.0.1"
	}
	return net.JoinHostPort(h, p)
}

// majorVersion reads "v2.1.0", "1.6.20~ds1" or "2.0.0-rc.1"; 0 if unknown.
func majorVersion(v string) int {
	v = strings.TrimPrefix(v, "v")
	m, _, _ := strings.Cut(v, ".")
	n, err := strconv.Atoi(m)
	if err != nil {
		return 0
	}
	return n
}

// ociStore adapts the containerd store to the mirror.
type ociStore struct{ s *ctrd.Store }

func (o ociStore) OpenBlob(ctx context.Context, k blob.Key) (httpmirror.OCIBlob, error) {
	b, err := o.s.Open(ctx, k)
	if err != nil {
		return nil, err // never a typed nil inside the interface
	}
	return b, nil
}

func (o ociStore) Resolve(ctx context.Context, name string) (blob.Key, error) {
	d, err := o.s.Resolve(ctx, name)
	if err != nil {
		return "", err
	}
	return blob.Key(d.Digest), nil
}

// catalog lists containerd's blobs under the FUSE mount.
type catalog struct{ s *ctrd.Store }

func (c catalog) List(ctx context.Context) ([]cache.Info, error) {
	var out []cache.Info
	for _, k := range c.s.Keys() {
		if size, ok := c.s.Size(k); ok {
			out = append(out, cache.Info{Key: k, Size: size, Present: size, Complete: true, Verified: true})
		}
	}
	return out, nil
}

func (c catalog) Stat(ctx context.Context, k blob.Key) (cache.Info, bool, error) {
	size, ok := c.s.Size(k)
	if !ok {
		return cache.Info{}, false, nil
	}
	return cache.Info{Key: k, Size: size, Present: size, Complete: true, Verified: true}, true, nil
}

// tagPollMax bounds how long a pulled or deleted tag waits to be advertised
// or dropped (containerd's image events are not shared with this loop).
const tagPollMax = 10 * time.Second

// enableTagResolution wires --resolve-tags: the mirror asks peers for a tag
// the local image store lacks, and this node advertises and answers its own
// tags (store nil: it only asks).
func enableTagResolution(ctx context.Context, a *app, oci *httpmirror.OCIConfig, store *ctrd.Store) error {
	c := &a.cfg.Containerd
	if !c.ResolveTags {
		return nil
	}
	if a.p2p == nil {
		return errors.New("--resolve-tags needs the peer network")
	}
	opts := p2p.TagOptions{Registries: oci.Registries}
	if store != nil {
		opts.Local = func(ctx context.Context, r p2p.TagRef) (p2p.TagTarget, error) {
			it, err := store.ResolveTag(ctx, r.String())
			if err != nil {
				return p2p.TagTarget{}, err
			}
			return p2p.TagTarget{Digest: blob.Key(it.Target.Digest), MediaType: it.Target.MediaType, Size: it.Target.Size, Updated: it.Updated}, nil
		}
	}
	tags, err := a.p2p.EnableTags(opts)
	if err != nil {
		return fmt.Errorf("--resolve-tags: %w", err)
	}
	oci.ResolveTag = func(ctx context.Context, registry, repo, tag string) (blob.Key, error) {
		r, err := p2p.ParseTagRef(registry, repo, tag)
		if err != nil {
			return "", fmt.Errorf("%v: %w", err, blob.ErrNotFound)
		}
		tt, err := tags.Resolve(ctx, r)
		return tt.Digest, err
	}
	a.log.Warn("--resolve-tags: tags missing from the local image store are resolved through peers; a peer's image for a tag may be older than the registry's",
		"registries", strings.Join(oci.Registries, ","))
	if store == nil {
		return nil
	}
	a.spawn(ctx, "tag watcher", func(wctx context.Context) {
		store.WatchTags(wctx, min(c.Resync, tagPollMax), func(names []string) {
			var refs []p2p.TagRef
			for _, n := range names {
				if r, err := p2p.ParseTagName(n); err == nil {
					refs = append(refs, r)
				}
			}
			tags.Set(refs)
		})
	})
	return nil
}

// containerd's content store is whole and verified (p2p's fan-out).
var _ p2p.WholeStore = (*containerd.Store)(nil)
