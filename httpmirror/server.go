// Package httpmirror serves every HTTP route of a node: the Overlaybd
// /blobs/ proxy, the OCI /v2/ mirror, health and metrics. Routes are matched
// on the raw request path, never cleaned: /blobs/ carries a whole URL whose
// "//" must survive.
package httpmirror

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/transfer"
	"github.com/peerd-project/peerd/upstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Config wires a Server.
type Config struct {
	Cache    *cache.Cache
	Upstream *upstream.Client
	Allow    *upstream.AllowList
	// Plan says where a /blobs/ read's missing bytes come from besides the
	// origin the request names; nil means the origin alone.
	Plan cache.Planner
	// Learn, when set, hears the origin a digest blob was fetched from, for
	// faces that know only digests (the FUSE mount).
	Learn func(k blob.Key, origin blob.Source)
	// Transfers, when set, records every blob GET (the debug page's recent
	// transfers).
	Transfers *transfer.Log
	// Prefetch starts a background fill of a whole blob on its first read.
	Prefetch        bool
	PrefetchWorkers int
	// Ready reports nil when the node is ready to serve.
	Ready func() error
	// OCI, when set, serves /v2/ (the containerd mirror).
	OCI http.Handler
	// Extra routes by exact path, or by prefix when the key ends in "/"
	// (debug pages and the like).
	Extra    map[string]http.Handler
	Gatherer prometheus.Gatherer
	Registry prometheus.Registerer
	Logger   *slog.Logger
}

// MaxRequestURI bounds the request target of every route. A signed storage
// URL with a session token fits in a few KiB; a longer one would only be
// echoed back and logged at its full length.
const MaxRequestURI = 8 << 10

// Server is the node's HTTP face.
type Server struct {
	cfg     Config
	log     *slog.Logger
	metrics http.Handler
	reqs    *prometheus.CounterVec
	dur     *prometheus.HistogramVec
	served  *prometheus.CounterVec
}

// New builds a Server.
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.PrefetchWorkers <= 0 {
		cfg.PrefetchWorkers = 4
	}
	if cfg.Allow == nil {
		cfg.Allow = &upstream.AllowList{}
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("component", "http")}
	s.reqs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "peerd_http_requests_total", Help: "HTTP requests by route and status code.",
	}, []string{"route", "code"})
	s.dur = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "peerd_http_request_duration_seconds", Help: "Time to answer an HTTP request (headers and body), by route.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18),
	}, []string{"route"})
	s.served = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "peerd_served_bytes_total", Help: "Body bytes served to clients, by route.",
	}, []string{"route"})
	if cfg.Registry != nil {
		cfg.Registry.MustRegister(s.reqs, s.dur, s.served)
	}
	if cfg.Gatherer != nil {
		s.metrics = promhttp.HandlerFor(cfg.Gatherer, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)})
	}
	return s
}

// ServeHTTP routes on the raw path.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	start := time.Now()
	rw := &statusWriter{ResponseWriter: w}
	route := "other"
	switch {
	case len(r.RequestURI) > MaxRequestURI:
		s.log.Info("request URI too long", "bytes", len(r.RequestURI), "limit", MaxRequestURI)
		http.Error(rw, fmt.Sprintf("request URI of %d bytes is longer than the limit of %d", len(r.RequestURI), MaxRequestURI), http.StatusRequestURITooLong)
	case strings.HasPrefix(path, "/blobs/"):
		route = "blobs"
		s.serveBlobs(rw, r)
	case path == "/v2" || strings.HasPrefix(path, "/v2/"):
		route = "v2"
		if s.cfg.OCI == nil {
			ociError(rw, http.StatusNotFound, "UNSUPPORTED", "the OCI mirror is not enabled on this node")
		} else {
			s.cfg.OCI.ServeHTTP(rw, r)
		}
	case path == "/healthz":
		route = "healthz"
		rw.Header().Set("Content-Type", "text/plain")
		fmt.Fprintln(rw, "ok")
	case path == "/readyz":
		route = "readyz"
		s.serveReady(rw)
	case path == "/metrics/prometheus" && s.metrics != nil:
		route = "metrics"
		s.metrics.ServeHTTP(rw, r)
	default:
		if h := s.extra(path); h != nil {
			route = "extra"
			h.ServeHTTP(rw, r)
		} else {
			http.Error(rw, "not found", http.StatusNotFound)
		}
	}
	code := rw.code
	if code == 0 {
		code = http.StatusOK
	}
	s.reqs.WithLabelValues(route, strconv.Itoa(code)).Inc()
	s.dur.WithLabelValues(route).Observe(time.Since(start).Seconds())
	s.served.WithLabelValues(route).Add(float64(rw.n))
}

func (s *Server) extra(path string) http.Handler {
	if h, ok := s.cfg.Extra[path]; ok {
		return h
	}
	// The longest matching prefix wins (/debug/pprof/ over /debug/).
	var best string
	var bh http.Handler
	for p, h := range s.cfg.Extra {
		if strings.HasSuffix(p, "/") && strings.HasPrefix(path, p) && len(p) > len(best) {
			best, bh = p, h
		}
	}
	return bh
}

func (s *Server) serveReady(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/plain")
	if s.cfg.Ready != nil {
		if err := s.cfg.Ready(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "not ready: %v\n", err)
			return
		}
	}
	fmt.Fprintln(w, "ready")
}

func ociError(w http.ResponseWriter, code int, errCode, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	// encoding/json, not %q: Go quoting (\x7f, \a) is not JSON.
	type ociErr struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	json.NewEncoder(w).Encode(struct {
		Errors []ociErr `json:"errors"`
	}{[]ociErr{{errCode, msg}}})
}

// statusWriter records the status and body size, and keeps ReadFrom so that
// copying a file to the client still uses sendfile.
var (
	_ io.ReaderFrom = (*statusWriter)(nil)
	_ http.Flusher  = (*statusWriter)(nil)
)

type statusWriter struct {
	http.ResponseWriter
	code int
	n    int64
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.n += int64(n)
	return n, err
}

func (w *statusWriter) ReadFrom(r io.Reader) (int64, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	n, err := io.Copy(w.ResponseWriter, r) // http.response implements ReaderFrom: sendfile for *os.File
	w.n += n
	return n, err
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
