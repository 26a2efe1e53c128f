package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/peerd-project/peerd/artifact"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	ctrd "github.com/peerd-project/peerd/containerd"
	"github.com/peerd-project/peerd/fusefs"
	"github.com/peerd-project/peerd/httpmirror"
	"github.com/peerd-project/peerd/k8s"
	"github.com/peerd-project/peerd/p2p"
	"github.com/peerd-project/peerd/regauth"
	"github.com/peerd-project/peerd/transfer"
	"github.com/peerd-project/peerd/upstream"
	"github.com/peerd-project/peerd/web"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// runConfig is every flag of 'peerd run'. Each part of the daemon declares
// its own flags in its wire_*.go file.
type runConfig struct {
	DataDir         string
	HTTPAddr        string
	UpstreamAllow   listFlag
	CacheSize       byteSize
	ChunkSize       byteSize
	CacheDirectIO   bool
	Prefetch        bool
	PrefetchWorkers int
	LogLevel        string
	LogFormat       string
	ShutdownTimeout time.Duration
	DebugPprof      bool

	P2P        p2pConfig
	FUSE       fuseConfig
	Containerd containerdConfig
	K8s        k8sConfig
	Warm       warmConfig

	// settings are the effective flag values, for the debug page.
	settings []web.Setting
}

func init() {
	register("run", "run the node daemon", runCmd)
}

func registerCoreFlags(fs *flag.FlagSet, c *runConfig) {
	c.CacheSize = 10 << 30
	c.ChunkSize = 1 << 20
	fs.StringVar(&c.DataDir, "data-dir", "/var/lib/peerd", "folder for the content cache and the node's identity")
	fs.StringVar(&c.HTTPAddr, "http-addr", "127.0.0.1:30000", "address of the HTTP face (/blobs/, /v2/, /metrics/prometheus, /healthz, /readyz)")
	fs.Var(&c.UpstreamAllow, "upstream-allow", "origin hosts /blobs/ may fetch from: host, host:port, *.domain, *.domain:port (repeatable, comma-separated)")
	fs.Var(&c.CacheSize, "cache-size", "bound on the bytes the cache holds (units: KiB MiB GiB TiB, KB MB GB TB)")
	fs.Var(&c.ChunkSize, "chunk-size", "unit of fetching and caching")
	fs.BoolVar(&c.CacheDirectIO, "cache-direct-io", true, "write a blob filled from nothing around the page cache (O_DIRECT) until it verifies; false: every write goes through the page cache")
	fs.BoolVar(&c.Prefetch, "prefetch", false, "on the first read of a blob, fetch the rest of it in the background")
	fs.IntVar(&c.PrefetchWorkers, "prefetch-workers", 4, "concurrent chunk fetches of one blob's prefetch")
	fs.StringVar(&c.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", "text", "text or json")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", 10*time.Second, "how long a graceful shutdown waits for requests in flight")
	fs.BoolVar(&c.DebugPprof, "debug-pprof", false, "serve Go's profiler at /debug/pprof/ on --http-addr (keep --http-addr on loopback)")
}

func (c *runConfig) validate() error {
	var errs []error
	if c.DataDir == "" {
		errs = append(errs, errors.New("--data-dir must not be empty"))
	}
	if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
		errs = append(errs, fmt.Errorf("--http-addr %q: %v", c.HTTPAddr, err))
	}
	if c.ChunkSize < 4096 || c.ChunkSize > 64<<20 {
		errs = append(errs, fmt.Errorf("--chunk-size %s: want 4KiB to 64MiB", c.ChunkSize.String()))
	}
	if c.CacheSize < c.ChunkSize {
		errs = append(errs, fmt.Errorf("--cache-size %s is smaller than one chunk", c.CacheSize.String()))
	}
	if c.ShutdownTimeout <= 0 || c.ShutdownTimeout > 10*time.Minute {
		errs = append(errs, fmt.Errorf("--shutdown-timeout %v: want more than 0 and at most 10m", c.ShutdownTimeout))
	}
	if c.PrefetchWorkers < 1 || c.PrefetchWorkers > 64 {
		errs = append(errs, fmt.Errorf("--prefetch-workers %d: want 1 to 64", c.PrefetchWorkers))
	}
	if err := c.Warm.validate(c.Containerd.pullThroughServers()); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func newLogger(level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %v", level, err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

// app is the running daemon: what each part built, for the parts after it.
type app struct {
	cfg      *runConfig
	log      *slog.Logger
	reg      *prometheus.Registry
	cache    *cache.Cache
	upstream *upstream.Client
	// learned remembers the origins /blobs/ requests named, per digest.
	learned *upstream.Learned

	// peers is the peer network as a source (set by the p2p part; nil if
	// it is off), containerd its content store (set by the containerd part;
	// nil if it is off): both for plan.
	peers      *p2p.Source
	containerd blob.Source
	// p2p is the peer network node (set by the p2p part; nil if it is off).
	p2p *p2p.Node
	// readyChecks must all pass for /readyz.
	readyChecks []func() error
	// oci is the /v2/ handler (set by the containerd part).
	oci http.Handler
	// extra HTTP routes.
	extra map[string]http.Handler
	// auth holds --registry-auth-file's credentials (nil without it).
	auth *regauth.Keychain
	// art resolves references for the mount and warming (see artifacts).
	art     *artifact.Resolver
	artOnce sync.Once
	// blobCatalogs list further blobs the FUSE mount shows (set by the containerd part).
	blobCatalogs []blobCatalog

	// fuse is the blob filesystem and events the Kubernetes event recorder,
	// for the doctor (set by their parts; nil when off).
	fuse   *fusefs.FS
	events *k8s.Events

	// For the debug page: when the node started, its recent transfers,
	// containerd's store and the mirror check's verdict (set by the
	// containerd part), the doctor (set by its part).
	started   time.Time
	transfers *transfer.Log
	ctrdStore *ctrd.Store
	mirror    atomic.Pointer[string]
	doctor    *daemonDoctor

	// onFatal hear the error run stops on, before shutdown (for P2PFailed).
	onFatal []func(context.Context, error)

	mu      sync.Mutex
	closers []func(context.Context) error // run in reverse order at shutdown
}

// The runtime modes (the debug page, status, peerd_runtime_mode).
const (
	runtimeContainerd = "containerd"
	runtimeNone       = "none"
)

// runtimeMode says whether this node shares through containerd's content
// store or only through its own cache.
func (a *app) runtimeMode() string {
	if a.ctrdStore != nil {
		return runtimeContainerd
	}
	return runtimeNone
}

func (a *app) onStop(f func(context.Context) error) {
	a.mu.Lock()
	a.closers = append(a.closers, f)
	a.mu.Unlock()
}

// spawn runs f in a goroutine until peerd stops, and at shutdown cancels it
// and waits for it (as long as the shutdown timeout allows).
func (a *app) spawn(ctx context.Context, what string, f func(context.Context)) {
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(rctx)
	}()
	a.onStop(func(sctx context.Context) error {
		cancel()
		select {
		case <-done:
			return nil
		case <-sctx.Done():
			return fmt.Errorf("%s did not stop: %w", what, sctx.Err())
		}
	})
}

// ready is nil when every part is ready, else every reason (an operator
// fixing one should not discover the next only after a restart).
func (a *app) ready() error {
	var errs []error
	for _, c := range a.readyChecks {
		if err := c(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func runCmd(args []string) error {
	cfg := &runConfig{}
	fs := newFlagSet("run", "Run the node daemon: the content cache and its faces (HTTP, peers, FUSE, containerd).")
	registerCoreFlags(fs, cfg)
	registerP2PFlags(fs, &cfg.P2P)
	registerFUSEFlags(fs, &cfg.FUSE)
	registerWarmFlags(fs, &cfg.Warm)
	registerContainerdFlags(fs, &cfg.Containerd)
	registerK8sFlags(fs, &cfg.K8s)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := cfg.validate(); err != nil {
		return err
	}
	cfg.settings = effectiveSettings(fs)
	log, err := newLogger(cfg.LogLevel, cfg.LogFormat)
	if err != nil {
		return err
	}
	slog.SetDefault(log)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err = run(ctx, cfg, log)
	if err != nil {
		log.Error("peerd stopped with an error", "err", err)
	}
	return err
}

func run(ctx context.Context, cfg *runConfig, log *slog.Logger) (err error) {
	a := &app{cfg: cfg, log: log, reg: prometheus.NewRegistry(), extra: map[string]http.Handler{},
		started: time.Now(), transfers: transfer.NewLog(transferLogSize)}
	a.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, mode := range []string{runtimeContainerd, runtimeNone} {
		a.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "peerd_runtime_mode",
			Help:        "1 for the mode this node runs in: containerd (it reads and follows containerd's content store) or none (what it pulls through stays in its own cache and is shared from there, as for CRI-O and Podman).",
			ConstLabels: prometheus.Labels{"mode": mode},
		}, func() float64 {
			if a.runtimeMode() == mode {
				return 1
			}
			return 0
		}))
	}
	log.Info("starting peerd", "version", version, "data-dir", cfg.DataDir, "http-addr", cfg.HTTPAddr)

	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("create --data-dir: %w", err)
	}
	allow, err := upstream.ParseAllowList(cfg.UpstreamAllow.items)
	if err != nil {
		return fmt.Errorf("--upstream-allow: %w", err)
	}
	if allow.Len() == 0 {
		log.Warn("no --upstream-allow patterns: /blobs/ will refuse every origin")
	}
	a.cache, err = cache.Open(cache.Options{
		Dir:            filepath.Join(cfg.DataDir, "cache"),
		ChunkSize:      int64(cfg.ChunkSize),
		MaxBytes:       int64(cfg.CacheSize),
		BufferedWrites: !cfg.CacheDirectIO,
		Logger:         log,
		Registerer:     a.reg,
	})
	if err != nil {
		return err
	}
	a.onStop(func(context.Context) error { return a.cache.Close() })
	a.upstream = upstream.NewClient(upstream.Options{UserAgent: "peerd/" + version, Logger: log})
	a.learned = upstream.NewLearned(4096, 30*time.Minute)
	if f := cfg.Containerd.AuthFile; f != "" {
		kc, err := regauth.Load(f, a.upstream.HTTPClient())
		if err != nil {
			return fmt.Errorf("--registry-auth-file: %w", err)
		}
		a.auth = kc
		log.Info("registry credentials loaded", "file", f, "registries", len(kc.Registries()))
	}
	if cfg.DebugPprof {
		a.extra["/debug/pprof/"] = http.HandlerFunc(pprof.Index)
		a.extra["/debug/pprof/profile"] = http.HandlerFunc(pprof.Profile)
		a.extra["/debug/pprof/trace"] = http.HandlerFunc(pprof.Trace)
		a.extra["/debug/pprof/symbol"] = http.HandlerFunc(pprof.Symbol)
		a.extra["/debug/pprof/cmdline"] = http.HandlerFunc(pprof.Cmdline)
	}

	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
		defer cancel()
		if err != nil {
			for _, f := range a.onFatal {
				f(sctx, err)
			}
		}
		a.mu.Lock()
		closers := a.closers
		a.mu.Unlock()
		for i := len(closers) - 1; i >= 0; i-- {
			if cerr := closers[i](sctx); cerr != nil {
				log.Warn("shutdown step failed", "err", cerr)
			}
		}
		log.Info("peerd stopped")
	}()

	// Parts start in dependency order; each registers its own shutdown. The
	// mount comes before the HTTP face, so a node that answers /healthz has
	// every face up.
	for _, start := range []func(context.Context, *app) error{startP2P, startContainerd, startK8s, startFUSE, startDoctor, startDebug, startWarm} {
		if err := start(ctx, a); err != nil {
			return err
		}
	}

	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("listen on --http-addr %s: %w", cfg.HTTPAddr, err)
	}
	srv := &http.Server{
		Handler: httpmirror.New(httpmirror.Config{
			Cache:           a.cache,
			Upstream:        a.upstream,
			Allow:           allow,
			Plan:            a.planner(faceBlobs),
			Learn:           a.learned.Learn,
			Transfers:       a.transfers,
			Prefetch:        cfg.Prefetch,
			PrefetchWorkers: cfg.PrefetchWorkers,
			Ready:           a.ready,
			OCI:             a.oci,
			Extra:           a.extra,
			Gatherer:        a.reg,
			Registry:        a.reg,
			Logger:          log,
		}),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info("serving HTTP", "addr", ln.Addr().String())

	select {
	case <-ctx.Done():
		log.Info("shutting down", "reason", context.Cause(ctx))
	case err := <-serveErr:
		return fmt.Errorf("http server: %w", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		if !errors.Is(err, context.DeadlineExceeded) {
			log.Warn("http shutdown", "err", err)
		}
		// Responses still running after --shutdown-timeout (a client that
		// stopped reading) are cut, so that nothing writes into the cache
		// or its files while they close.
		srv.Close()
	}
	return nil
}
