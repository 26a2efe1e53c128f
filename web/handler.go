package web

import (
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/peerd-project/peerd/transfer"
)

// Prefix is where the daemon mounts the Handler on --http-addr.
const Prefix = "/debug/"

// ErrBusy is what Provider.Measure returns while another measurement runs.
var ErrBusy = errors.New("a measurement is already running")

// Options tune the Handler; the zero value is usable.
type Options struct {
	// PageSize is the rows per page of blobs, transfers and peers
	// (100 when 0), which bounds the page's size however large the node.
	PageSize int
	// MeasureTimeout bounds one measurement (2 minutes when 0).
	MeasureTimeout time.Duration
	// Refresh is how often the page refetches itself when JavaScript runs
	// (5 seconds when 0).
	Refresh time.Duration
	// Now is the clock (time.Now when nil).
	Now func() time.Time
}

//go:embed tmpl/*.html static/*
var files embed.FS

type handler struct {
	p         Provider
	o         Options
	measuring chan struct{} // holds a token while a measurement runs
	cop       *http.CrossOriginProtection
	index     *template.Template
	blob      *template.Template
	measure   *template.Template
}

var _ http.Handler = (*handler)(nil)

// Handler serves the debug page and its JSON API under Prefix. Paths under
// /debug/pprof/ belong to the profiler, mounted separately; here they are 404.
func Handler(p Provider, o Options) http.Handler {
	if o.PageSize <= 0 {
		o.PageSize = 100
	}
	if o.MeasureTimeout <= 0 {
		o.MeasureTimeout = 2 * time.Minute
	}
	if o.Refresh <= 0 {
		o.Refresh = 5 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	h := &handler{p: p, o: o, measuring: make(chan struct{}, 1), cop: http.NewCrossOriginProtection()}
	parse := func(page string) *template.Template {
		return template.Must(template.New("").Funcs(funcs).ParseFS(files, "tmpl/layout.html", "tmpl/"+page))
	}
	h.index, h.blob, h.measure = parse("index.html"), parse("blob.html"), parse("measure.html")
	return h
}

// The page loads nothing but its own stylesheet and script, so markup that
// escaped escaping still could not run or call out.
const csp = "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hd := w.Header()
	hd.Set("Content-Security-Policy", csp)
	hd.Set("X-Content-Type-Options", "nosniff")
	hd.Set("Referrer-Policy", "no-referrer")
	hd.Set("X-Frame-Options", "DENY")
	hd.Set("Cache-Control", "no-store")

	rest, ok := strings.CutPrefix(r.URL.Path, Prefix)
	if !ok {
		http.NotFound(w, r)
		return
	}
	switch {
	case rest == "":
		if h.methods(w, r, false) {
			h.serveIndex(w, r)
		}
	case rest == "static/page.css" || rest == "static/page.js":
		if h.methods(w, r, false) {
			h.serveStatic(w, r, rest)
		}
	case strings.HasPrefix(rest, "blobs/"):
		if h.methods(w, r, false) {
			h.serveBlob(w, r, strings.TrimPrefix(rest, "blobs/"))
		}
	case rest == "measure":
		if h.methods(w, r, true) {
			h.serveMeasure(w, r)
		}
	case rest == "api/snapshot":
		if h.methods(w, r, false) {
			writeJSON(w, r, http.StatusOK, h.snapshot())
		}
	case rest == "api/blobs":
		if h.methods(w, r, false) {
			page, code, err := h.blobPage(r.URL.Query())
			if err != nil {
				apiError(w, code, err.Error())
				return
			}
			writeJSON(w, r, http.StatusOK, page)
		}
	case strings.HasPrefix(rest, "api/blobs/"):
		if h.methods(w, r, false) {
			h.serveAPIBlob(w, r, strings.TrimPrefix(rest, "api/blobs/"))
		}
	case rest == "api/transfers":
		if h.methods(w, r, false) {
			page, err := pageOf(h.snapshot().Transfers, r.URL.Query(), "page", h.o.PageSize)
			if err != nil {
				apiError(w, http.StatusBadRequest, err.Error())
				return
			}
			writeJSON(w, r, http.StatusOK, page)
		}
	case rest == "api/measure":
		if h.methods(w, r, true) {
			h.serveAPIMeasure(w, r)
		}
	case strings.HasPrefix(rest, "pprof/"):
		http.Error(w, "404 not found: the profiler is served here only with --debug-pprof", http.StatusNotFound)
	default:
		http.Error(w, "404 not found: no debug page at "+strconv.Quote(r.URL.Path), http.StatusNotFound)
	}
}

// methods answers 405 with Allow unless r's method suits the route: GET and
// HEAD for reads, POST alone for the measurement.
func (h *handler) methods(w http.ResponseWriter, r *http.Request, post bool) bool {
	allow := "GET, HEAD"
	ok := r.Method == http.MethodGet || r.Method == http.MethodHead
	if post {
		allow, ok = "POST", r.Method == http.MethodPost
	}
	if !ok {
		w.Header().Set("Allow", allow)
		http.Error(w, fmt.Sprintf("405 method %s not allowed here: use %s", r.Method, allow), http.StatusMethodNotAllowed)
	}
	return ok
}

func (h *handler) serveStatic(w http.ResponseWriter, r *http.Request, name string) {
	b, err := files.ReadFile(name)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	ct := "text/css; charset=utf-8"
	if strings.HasSuffix(name, ".js") {
		ct = "text/javascript; charset=utf-8"
	}
	w.Header().Set("Content-Type", ct)
	// The assets change only with the binary; a short cache keeps the
	// refreshes cheap without pinning an old script after an upgrade.
	w.Header().Set("Cache-Control", "max-age=300")
	if r.Method != http.MethodHead {
		w.Write(b)
	}
}

// snapshot is the provider's snapshot with the page's own guards applied:
// no query string, userinfo or secret-looking flag value leaves the node.
func (h *handler) snapshot() Snapshot {
	s := h.p.Snapshot()
	tr := make([]transfer.Record, len(s.Transfers))
	for i, t := range s.Transfers {
		t.What, t.Key, t.Result = Redact(t.What), Redact(t.Key), RedactText(t.Result)
		tr[i] = t
	}
	s.Transfers = tr
	cfg := make([]Setting, len(s.Config))
	for i, c := range s.Config {
		if secretFlag(c.Flag) {
			if c.Value != "" {
				c.Value = "(redacted)"
			}
		} else if strings.Contains(c.Value, "://") {
			c.Value = Redact(c.Value)
		}
		cfg[i] = c
	}
	s.Config = cfg
	sw := make([]SwarmPull, len(s.Swarm))
	for i, p := range s.Swarm {
		p.Key = Redact(p.Key)
		sw[i] = p
	}
	s.Swarm = sw
	peers := make([]Peer, len(s.Peers))
	for i, p := range s.Peers {
		p.LastFailure = RedactText(p.LastFailure)
		peers[i] = p
	}
	s.Peers = peers
	doc := make([]Finding, len(s.Doctor))
	for i, f := range s.Doctor {
		f.Saw, f.Fix = RedactText(f.Saw), RedactText(f.Fix)
		doc[i] = f
	}
	s.Doctor = doc
	if s.Node.Addrs == nil {
		s.Node.Addrs = []string{}
	}
	if s.Peers == nil {
		s.Peers = []Peer{}
	}
	if s.Doctor == nil {
		s.Doctor = []Finding{}
	}
	return s
}

func secretFlag(name string) bool {
	n := strings.ToLower(name)
	for _, w := range []string{"token", "password", "secret", "auth", "credential"} {
		if strings.Contains(n, w) {
			return true
		}
	}
	return false
}

// Page is one page of a list, as the API serves it.
type Page[T any] struct {
	Items    []T `json:"items"`
	Total    int `json:"total"`
	Page     int `json:"page"`
	Pages    int `json:"pages"`
	PageSize int `json:"pageSize"`
}

// BlobPage is one page of the blob list with its order.
type BlobPage struct {
	Page[Blob]
	Sort  string `json:"sort"`
	Order string `json:"order"`
}

// pageOf cuts page q[param] (1 when absent) out of all. A page past the end
// is an error, so a stale link says so instead of showing an empty table.
func pageOf[T any](all []T, q url.Values, param string, size int) (Page[T], error) {
	p := Page[T]{Total: len(all), Page: 1, PageSize: size, Pages: max(1, (len(all)+size-1)/size)}
	if v := q.Get(param); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return p, fmt.Errorf("%s=%q: want a page number from 1", param, v)
		}
		if n > p.Pages {
			return p, fmt.Errorf("%s=%d: past the last page, %d", param, n, p.Pages)
		}
		p.Page = n
	}
	lo := (p.Page - 1) * size
	p.Items = all[lo:min(lo+size, len(all))]
	if p.Items == nil {
		p.Items = []T{}
	}
	return p, nil
}

// sortKeys are the blob list's orders and their natural direction.
var sortKeys = map[string]string{
	"access": "desc", "key": "asc", "size": "desc", "present": "desc",
	"verified": "desc", "store": "asc", "readers": "desc",
}

func sortKeyList() string {
	keys := make([]string, 0, len(sortKeys))
	for k := range sortKeys {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return strings.Join(keys, ", ")
}

// blobPage sorts the provider's blobs by q's sort and order and cuts q's
// page; the int is the status for the error.
func (h *handler) blobPage(q url.Values) (BlobPage, int, error) {
	key := q.Get("sort")
	if key == "" {
		key = "access"
	}
	def, ok := sortKeys[key]
	if !ok {
		return BlobPage{}, http.StatusBadRequest, fmt.Errorf("sort=%q: want one of %s", key, sortKeyList())
	}
	order := q.Get("order")
	if order == "" {
		order = def
	}
	if order != "asc" && order != "desc" {
		return BlobPage{}, http.StatusBadRequest, fmt.Errorf("order=%q: want asc or desc", order)
	}
	blobs := slices.Clone(h.p.Blobs())
	cmp := blobCmp(key)
	slices.SortStableFunc(blobs, func(a, b Blob) int {
		c := cmp(a, b)
		if order == "desc" {
			c = -c
		}
		if c == 0 {
			c = strings.Compare(a.Key, b.Key)
		}
		return c
	})
	for i := range blobs {
		blobs[i].Key = Redact(blobs[i].Key)
	}
	p, err := pageOf(blobs, q, "page", h.o.PageSize)
	if err != nil {
		return BlobPage{}, http.StatusBadRequest, err
	}
	return BlobPage{Page: p, Sort: key, Order: order}, http.StatusOK, nil
}

func blobCmp(key string) func(a, b Blob) int {
	num := func(f func(Blob) int64) func(a, b Blob) int {
		return func(a, b Blob) int {
			x, y := f(a), f(b)
			switch {
			case x < y:
				return -1
			case x > y:
				return 1
			}
			return 0
		}
	}
	switch key {
	case "size":
		return num(func(b Blob) int64 { return b.Size })
	case "present":
		return num(func(b Blob) int64 { return b.Present })
	case "readers":
		return num(func(b Blob) int64 { return int64(b.Readers) })
	case "verified":
		return num(func(b Blob) int64 {
			if b.Verified {
				return 1
			}
			return 0
		})
	case "access":
		return num(func(b Blob) int64 { return b.LastAccess.UnixNano() })
	case "store":
		return func(a, b Blob) int { return strings.Compare(a.Store, b.Store) }
	}
	return func(a, b Blob) int { return strings.Compare(a.Key, b.Key) }
}

// validKey refuses keys no blob can have before asking the provider.
func validKey(k string) error {
	if k == "" {
		return errors.New("no blob key: want /debug/blobs/<algorithm>:<hex>")
	}
	if len(k) > 200 {
		return errors.New("blob key longer than 200 bytes")
	}
	if strings.ContainsFunc(k, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) {
		return errors.New("blob key with spaces or control characters")
	}
	return nil
}

func (h *handler) serveAPIBlob(w http.ResponseWriter, r *http.Request, key string) {
	if err := validKey(key); err != nil {
		apiError(w, http.StatusBadRequest, err.Error())
		return
	}
	d, ok := h.p.Blob(key)
	if !ok {
		apiError(w, http.StatusNotFound, "this node holds no part of blob "+strconv.Quote(key))
		return
	}
	d.Key = Redact(d.Key)
	writeJSON(w, r, http.StatusOK, d)
}

func writeJSON(w http.ResponseWriter, r *http.Request, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	if r.Method == http.MethodHead {
		return
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// APIError is the body of every API error.
type APIError struct {
	Error string `json:"error"`
}

func apiError(w http.ResponseWriter, code int, reason string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(APIError{Error: reason})
}
