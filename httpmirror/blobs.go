package httpmirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/internal/httprange"
	"github.com/peerd-project/peerd/transfer"
	"github.com/peerd-project/peerd/upstream"
)

var (
	// Registry storage layout: .../blobs/sha256/<2 hex>/<64 hex>/data
	storagePathRE = regexp.MustCompile(`/sha256/([0-9a-f]{2})/([0-9a-f]{64})(/|$)`)
	// A digest anywhere in the path: .../blobs/sha256:<64 hex>
	digestInPathRE = regexp.MustCompile(`(?:^|/)sha256:([0-9a-f]{64})(?:[/?]|$)`)
)

// ParseBlobURL parses the upstream URL of a /blobs/ request from the raw
// request URI and derives its cache key. It rejects anything but an absolute
// http(s) URL without credentials.
func ParseBlobURL(requestURI string) (*url.URL, blob.Key, error) {
	raw := requestURI
	if !strings.HasPrefix(raw, "/") {
		// absolute-form request target: keep path and query only
		u, err := url.Parse(raw)
		if err != nil {
			return nil, "", fmt.Errorf("bad request target: %v", parseReason(err))
		}
		raw = u.RequestURI()
	}
	raw, ok := strings.CutPrefix(raw, "/blobs/")
	if !ok {
		return nil, "", errors.New("path does not start with /blobs/")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, "", fmt.Errorf("upstream URL %q: %v", truncate(raw), parseReason(err))
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return nil, "", fmt.Errorf("upstream URL %q: scheme must be http or https", truncate(raw))
	case u.Host == "" || u.Hostname() == "":
		return nil, "", fmt.Errorf("upstream URL %q: no host", truncate(raw))
	case u.User != nil:
		return nil, "", errors.New("upstream URL carries credentials; send them in an Authorization header")
	case u.Fragment != "" || u.Opaque != "":
		return nil, "", fmt.Errorf("upstream URL %q: unexpected fragment or opaque part", truncate(raw))
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return nil, "", fmt.Errorf("upstream URL: bad port %q", p)
		}
	}
	path := u.EscapedPath()
	// A dot segment would let the origin resolve the path to a file other
	// than the one whose digest the path names (the key), so refuse it.
	if unescaped, err := url.PathUnescape(path); err == nil {
		for _, seg := range strings.Split(unescaped, "/") {
			if seg == "." || seg == ".." {
				return nil, "", fmt.Errorf("upstream URL %q: dot segment in the path", truncate(raw))
			}
		}
	}
	if m := storagePathRE.FindStringSubmatch(path); m != nil && m[2][:2] == m[1] {
		return u, blob.Key("sha256:" + m[2]), nil
	}
	if unescaped, err := url.PathUnescape(path); err == nil {
		if m := digestInPathRE.FindStringSubmatch(unescaped); m != nil {
			return u, blob.Key("sha256:" + m[1]), nil
		}
	}
	return u, blob.FromURL(u), nil
}

// truncate is the form a client's URL is echoed in: no query (signatures),
// no userinfo, bounded.
func truncate(s string) string { return upstream.RedactURL(s) }

// parseReason is url.Parse's reason without the URL it quotes whole.
func parseReason(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		return upstream.Bound(ue.Err.Error())
	}
	return upstream.Bound(upstream.RedactText(err.Error()))
}

func (s *Server) serveBlobs(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "only GET and HEAD", http.StatusMethodNotAllowed)
		return
	}
	if r.Header.Get(upstream.LoopHeader) != "" {
		// An origin fetch of peerd's own led here (a redirect back to a
		// /blobs/ face): serving it would wait on the fill it is part of.
		http.Error(w, "redirect loop: an origin redirected peerd back to a peerd /blobs/ URL", http.StatusLoopDetected)
		return
	}
	u, key, err := ParseBlobURL(r.RequestURI)
	if err != nil {
		s.log.Info("bad /blobs/ request", "err", err)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if err := s.cfg.Allow.Check(u); err != nil {
		s.log.Warn("refused upstream", "host", upstream.Bound(u.Host), "err", err)
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	// Only Authorization travels, and only to the origin.
	var hdr http.Header
	if a := r.Header.Get("Authorization"); a != "" {
		hdr = http.Header{"Authorization": {a}}
	}
	origin := s.cfg.Upstream.Source(u, hdr, s.cfg.Allow)
	if key.Verifiable() && s.cfg.Learn != nil {
		s.cfg.Learn(key, origin)
	}
	h := s.cfg.Cache.Open(key, s.cfg.Plan.Plan(key, origin))
	defer h.Close()
	what := u.Scheme + "://" + u.Host + u.EscapedPath() // never the query: it may carry a signature
	s.serveHandle(w, r, h, key, func(t transfer.Record) {
		t.Face, t.What = transfer.FaceBlobs, upstream.Bound(what)
		s.cfg.Transfers.Add(t)
	})
}

// blobReader is what serveHandle needs of a cache handle.
type blobReader interface {
	Size(ctx context.Context) (int64, error)
	WriteRange(ctx context.Context, w io.Writer, off, n int64) (int64, error)
	Prefetch(workers int)
	// Served says where the bytes written so far came from.
	Served() transfer.Bytes
}

// infoer is a blobReader that knows which peers served the blob.
type infoer interface{ Info() cache.Info }

var (
	_ infoer     = (*cache.Handle)(nil)
	_ blobReader = (*cache.Handle)(nil)
	_ blobReader = (*storeReader)(nil)
	_ blobReader = (*cacheLocal)(nil)
)

// serveHandle answers a GET or HEAD of a blob from h. For a GET, done hears
// the transfer it made (key, bytes by source, status, result, duration),
// also when the body was cut.
func (s *Server) serveHandle(w http.ResponseWriter, r *http.Request, h blobReader, key blob.Key, done func(transfer.Record)) {
	ctx := r.Context()
	start := time.Now()
	status, result := 0, "ok"
	if r.Method == http.MethodGet && done != nil {
		defer func() {
			if rec := recover(); rec != nil {
				if result == "ok" {
					result = "aborted"
				}
				defer panic(rec)
			}
			t := transfer.Record{Start: start, Key: string(key), Bytes: h.Served(), Duration: time.Since(start), Status: status, Result: result}
			if i, ok := h.(infoer); ok && t.Bytes.Peers > 0 {
				t.Peers = i.Info().Peers
			}
			done(t)
		}()
	}
	size, err := h.Size(ctx)
	if err != nil {
		status, result = s.fetchError(w, key, err), upstream.Bound(upstream.RedactText(err.Error()))
		return
	}
	off, n, partial, err := parseRange(r.Header.Get("Range"), size)
	if err != nil {
		w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
		http.Error(w, err.Error(), http.StatusRequestedRangeNotSatisfiable)
		status, result = http.StatusRequestedRangeNotSatisfiable, "range not satisfiable"
		return
	}
	hd := w.Header()
	hd.Set("Accept-Ranges", "bytes")
	hd.Set("Content-Type", "application/octet-stream")
	hd.Set("Content-Length", strconv.FormatInt(n, 10))
	if key.Verifiable() {
		hd.Set("Docker-Content-Digest", string(key))
		hd.Set("Etag", `"`+string(key)+`"`)
	}
	status = http.StatusOK
	if partial {
		hd.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, off+n-1, size))
		status = http.StatusPartialContent
	}
	if r.Method == http.MethodHead {
		w.WriteHeader(status)
		return
	}
	if s.cfg.Prefetch {
		h.Prefetch(s.cfg.PrefetchWorkers)
	}
	lw := &lazyHeader{w: w, status: status}
	written, err := h.WriteRange(ctx, lw, off, n)
	if err == nil {
		lw.commit()
		return
	}
	result = upstream.Bound(upstream.RedactText(err.Error()))
	if !lw.wrote {
		for _, k := range []string{"Content-Length", "Content-Range", "Docker-Content-Digest", "Etag", "Accept-Ranges"} {
			hd.Del(k)
		}
		status = s.fetchError(w, key, err)
		return
	}
	// Headers are gone: cut the connection so the client sees a short body.
	s.log.Warn("blob body aborted", "key", key, "off", off+written, "err", err)
	panic(http.ErrAbortHandler)
}

// fetchError answers a failed fetch and returns the status it sent (0 when
// the client had gone).
func (s *Server) fetchError(w http.ResponseWriter, key blob.Key, err error) int {
	var se *upstream.StatusError
	code := http.StatusBadGateway
	switch {
	case errors.As(err, &se) && se.Code >= 400 && se.Code < 500:
		// The origin's own refusal (401 with its challenge, 403, 410...): relay it.
		if c := se.Header.Get("Www-Authenticate"); c != "" {
			w.Header().Set("Www-Authenticate", c)
		}
		code = se.Code
	case errors.Is(err, blob.ErrNotFound):
		code = http.StatusNotFound
	case errors.Is(err, upstream.ErrNotAllowed):
		code = http.StatusForbidden
	case errors.Is(err, context.Canceled):
		return 0 // client went away
	case errors.Is(err, context.DeadlineExceeded):
		s.log.Warn("blob fetch timed out", "key", key, "err", err)
		code = http.StatusGatewayTimeout
	default:
		s.log.Warn("blob fetch failed", "key", key, "err", err)
	}
	http.Error(w, err.Error(), code)
	return code
}

// lazyHeader sends the status line with the first body byte, so an error
// before any byte can still become a proper error status.
var (
	_ io.ReaderFrom = (*lazyHeader)(nil)
	_ http.Flusher  = (*lazyHeader)(nil)
)

type lazyHeader struct {
	w      http.ResponseWriter
	status int
	wrote  bool
}

func (l *lazyHeader) commit() {
	if !l.wrote {
		l.wrote = true
		l.w.WriteHeader(l.status)
	}
}

func (l *lazyHeader) Write(p []byte) (int, error) {
	l.commit()
	return l.w.Write(p)
}

// Flush sends the header and what the body holds so far: the cache calls it
// after bytes of a chunk still arriving, so they do not wait in a buffer.
func (l *lazyHeader) Flush() {
	l.commit()
	_ = http.NewResponseController(l.w).Flush()
}

func (l *lazyHeader) ReadFrom(r io.Reader) (int64, error) {
	first := !l.wrote
	l.commit()
	if rf, ok := l.w.(io.ReaderFrom); ok {
		if first {
			// Send the header now: net/http otherwise reads the first 512
			// body bytes through user space (to sniff a type we already set)
			// before it hands the file to sendfile.
			_ = http.NewResponseController(l.w).Flush()
		}
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{l.w}, r)
}

// parseRange places a client's Range header in a blob of size bytes; no
// header means the whole blob. An error is answered 416.
func parseRange(h string, size int64) (off, n int64, partial bool, err error) {
	if h == "" {
		return 0, size, false, nil
	}
	spec, err := httprange.Parse(h)
	if err != nil {
		return 0, 0, false, err
	}
	off, n, err = spec.Resolve(size)
	return off, n, err == nil, err
}
