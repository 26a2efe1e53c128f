package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/peerd-project/peerd/artifact"
	"github.com/peerd-project/peerd/transfer"
	"github.com/peerd-project/peerd/upstream"
)

// warmPath is the daemon's warm endpoint (on --http-addr). A request must
// carry warmHeader: a browser cannot send it to another origin without
// asking first, so a web page cannot make a node fetch gigabytes.
const (
	warmPath    = "/api/warm"
	warmHeader  = "X-Peerd-Warm"
	warmResolve = 30 * time.Second // resolving a reference, before any bytes
)

// warmConfig holds the warm flags.
type warmConfig struct {
	Refs listFlag
	Rate byteSize
}

func registerWarmFlags(fs *flag.FlagSet, c *warmConfig) {
	c.Rate = 50 << 20
	fs.Var(&c.Refs, "warm", "references to fetch into the cache at start, from peers first: <registry>/<repository>:<tag> or @sha256:<hex>, the registry one of --registries (repeatable, comma-separated)")
	fs.Var(&c.Rate, "warm-rate", "bound on the bytes per second a node's warming reads (--warm and peerd warm; 0: none), so warming does not crowd the node's own pulls")
}

// validate checks --warm's references against the registries the node
// may read from.
func (c *warmConfig) validate(registries map[string]string) error {
	var errs []error
	if len(c.Refs.items) > 0 && len(registries) == 0 {
		errs = append(errs, errors.New("--warm needs --registries: a reference is resolved at its registry"))
	}
	for _, r := range c.Refs.items {
		t, err := artifact.ParseTarget(r)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("--warm: %w", err))
		case len(registries) > 0 && registries[t.Registry] == "":
			errs = append(errs, fmt.Errorf("--warm %s: registry %s is not in --registries", r, t.Registry))
		}
	}
	return errors.Join(errs...)
}

// warmEvent is one line of a warm's progress (JSON lines).
type warmEvent struct {
	Ref      string `json:"ref"`
	File     string `json:"file,omitempty"`
	FileSize int64  `json:"fileSize,omitempty"`
	FileDone int64  `json:"fileDone,omitempty"`
	// FileBytes is the current file's bytes by source, Bytes the warm's.
	FileBytes transfer.Bytes `json:"fileBytes"`
	Files     int            `json:"files"`
	Total     int64          `json:"total"`
	Done      int64          `json:"done"`
	Bytes     transfer.Bytes `json:"bytes"`
	Seconds   float64        `json:"seconds"`
	Finished  bool           `json:"finished,omitempty"`
	Error     string         `json:"error,omitempty"`
}

// warmer fetches whole images and artifacts into the cache.
type warmer struct {
	a   *app
	res *artifact.Resolver

	one sync.Mutex // one warm at a time: they share the rate

	paceMu    sync.Mutex
	paceStart time.Time
	paced     int64
}

var _ http.Handler = (*warmer)(nil)

// startWarm serves warmPath and warms --warm's references in the background.
func startWarm(ctx context.Context, a *app) error {
	c := a.cfg.Warm
	res := a.artifacts()
	if res == nil {
		// No --registries (so no --warm: validate): say so to peerd warm.
		a.extra[warmPath] = http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
			http.Error(rw, "this node has no --registries: a reference is resolved at its registry", http.StatusBadRequest)
		})
		return nil
	}
	w := &warmer{a: a, res: res}
	a.extra[warmPath] = w
	if len(c.Refs.items) > 0 {
		go w.warmAtStart(ctx, c.Refs.items)
	}
	return nil
}

// warmAtStart warms refs once the node is ready, each up to three times.
func (w *warmer) warmAtStart(ctx context.Context, refs []string) {
	for w.a.ready() != nil {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
	for _, ref := range refs {
		for try := 1; ; try++ {
			var last warmEvent
			err := w.warm(ctx, ref, func(e warmEvent) { last = e })
			if err == nil {
				w.a.log.Info("warmed", "ref", ref, "files", last.Files, "bytes", last.Done, "seconds", last.Seconds,
					"cache", last.Bytes.Cache, "containerd", last.Bytes.Containerd, "peers", last.Bytes.Peers, "origin", last.Bytes.Origin)
				break
			}
			if ctx.Err() != nil {
				return
			}
			if try == 3 {
				w.a.log.Warn("warming failed; giving up", "ref", ref, "tries", try, "err", err)
				break
			}
			w.a.log.Warn("warming failed; trying again in 30s", "ref", ref, "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(30 * time.Second):
			}
		}
	}
}

// warmError is a warm refused before any bytes moved, with its HTTP status.
type warmError struct {
	code int
	err  error
}

func (e *warmError) Error() string { return e.err.Error() }
func (e *warmError) Unwrap() error { return e.err }

// resolve turns ref into the files to warm.
func (w *warmer) resolve(ctx context.Context, ref string) (artifact.Target, artifact.Tree, error) {
	t, err := artifact.ParseTarget(ref)
	if err != nil {
		return t, artifact.Tree{}, &warmError{http.StatusBadRequest, err}
	}
	if !w.res.Allowed(t.Registry) {
		return t, artifact.Tree{}, &warmError{http.StatusBadRequest, fmt.Errorf("registry %s is not in --registries", t.Registry)}
	}
	rctx, cancel := context.WithTimeout(ctx, warmResolve)
	defer cancel()
	tree, err := w.res.Resolve(rctx, t.Registry, t.Namespace, t.Ref)
	switch {
	case errors.Is(err, artifact.ErrDenied):
		return t, tree, &warmError{http.StatusForbidden, err}
	case err != nil:
		return t, tree, &warmError{http.StatusNotFound, err}
	}
	return t, tree, nil
}

// warm reads every file of ref through the cache to its end, calling emit
// with the progress at most every 250 ms, at each file's end and at the end.
func (w *warmer) warm(ctx context.Context, ref string, emit func(warmEvent)) error {
	t, tree, err := w.resolve(ctx, ref)
	if err != nil {
		return err
	}
	return w.fetch(ctx, t, tree, emit)
}

func (w *warmer) fetch(ctx context.Context, t artifact.Target, tree artifact.Tree, emit func(warmEvent)) error {
	w.one.Lock()
	defer w.one.Unlock()
	ev := warmEvent{Ref: t.String(), Files: len(tree.Files)}
	for _, f := range tree.Files {
		ev.Total += f.Size
	}
	start := time.Now()
	last := time.Time{}
	send := func(force bool) {
		if now := time.Now(); force || now.Sub(last) >= 250*time.Millisecond {
			last = now
			ev.Seconds = now.Sub(start).Seconds()
			emit(ev)
		}
	}
	send(true)
	chunk := int64(w.a.cfg.ChunkSize)
	buf := make([]byte, chunk)
	var err error
	var whole transfer.Bytes // the files done
	for _, f := range tree.Files {
		ev.File, ev.FileSize, ev.FileDone, ev.FileBytes = f.Name, f.Size, 0, transfer.Bytes{}
		var got transfer.Bytes
		got, err = w.fetchFile(ctx, f, buf, func(n int64, sofar transfer.Bytes) {
			ev.FileDone += n
			ev.Done += n
			ev.FileBytes = sofar
			ev.Bytes = whole
			ev.Bytes.Add(sofar)
			send(false)
		})
		whole.Add(got)
		ev.FileBytes, ev.Bytes = got, whole
		if err != nil {
			err = fmt.Errorf("%s (%s): %w", f.Name, f.Key, err)
			break
		}
		send(true)
	}
	ev.File, ev.FileSize, ev.FileDone, ev.FileBytes = "", 0, 0, transfer.Bytes{}
	ev.Finished = true
	if err != nil {
		ev.Error = err.Error()
	}
	send(true)
	return err
}

// fetchFile reads one blob through the cache to its end, paced, and
// returns where its bytes came from; progress is told each chunk's length
// and the tally so far.
func (w *warmer) fetchFile(ctx context.Context, f artifact.File, buf []byte, progress func(int64, transfer.Bytes)) (transfer.Bytes, error) {
	h := w.a.cache.Open(f.Key, w.a.plan(faceFUSE, f.Key, f.Origin))
	defer h.Close()
	for off := int64(0); off < f.Size; {
		n, err := h.ReadAt(ctx, buf[:min(int64(len(buf)), f.Size-off)], off)
		off += int64(n)
		if n > 0 {
			progress(int64(n), h.Served())
		}
		if err != nil && off < f.Size {
			return h.Served(), err
		}
		if n == 0 && err == nil {
			return h.Served(), fmt.Errorf("no progress at %d of %d bytes", off, f.Size)
		}
		if err := w.pace(ctx, int64(n)); err != nil {
			return h.Served(), err
		}
	}
	if info, ok := w.a.cache.Stat(f.Key); ok && !info.Verified && f.Key.Verifiable() {
		w.a.log.Debug("warmed blob not verified yet", "key", f.Key)
	}
	return h.Served(), nil
}

// pace sleeps so that warming reads stay under --warm-rate over time; a
// pause of a second or more starts a new measure.
func (w *warmer) pace(ctx context.Context, n int64) error {
	rate := int64(w.a.cfg.Warm.Rate)
	if rate <= 0 {
		return nil
	}
	w.paceMu.Lock()
	now := time.Now()
	due := w.paceStart.Add(time.Duration(float64(w.paced) / float64(rate) * float64(time.Second)))
	if w.paceStart.IsZero() || now.Sub(due) > time.Second {
		w.paceStart, w.paced = now, 0
		due = now
	}
	w.paced += n
	wait := due.Add(time.Duration(float64(n) / float64(rate) * float64(time.Second))).Sub(now)
	w.paceMu.Unlock()
	if wait <= 0 {
		return nil
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ServeHTTP is POST warmPath?ref=<reference>: the progress as JSON lines,
// the last one with "finished" (and "error" when it failed). A reference
// that cannot be resolved is refused before any line: 400 (malformed, a
// registry not listed), 403 (the registry refused), 404.
func (w *warmer) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		rw.Header().Set("Allow", http.MethodPost)
		http.Error(rw, "POST "+warmPath+"?ref=<registry>/<repository>:<tag>", http.StatusMethodNotAllowed)
		return
	}
	if r.Header.Get(warmHeader) != "1" {
		http.Error(rw, "send the header "+warmHeader+": 1 (peerd warm does)", http.StatusForbidden)
		return
	}
	ref := r.URL.Query().Get("ref")
	t, tree, err := w.resolve(r.Context(), ref)
	if err != nil {
		code := http.StatusNotFound
		var we *warmError
		if errors.As(err, &we) {
			code = we.code
		}
		http.Error(rw, err.Error(), code)
		return
	}
	rw.Header().Set("Content-Type", "application/x-ndjson")
	rw.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(rw)
	fl, _ := rw.(http.Flusher)
	w.fetch(r.Context(), t, tree, func(e warmEvent) {
		enc.Encode(e)
		if fl != nil {
			fl.Flush()
		}
	})
}

// artifacts is the node's reference resolver, shared by the mount's oci
// folder and warming; nil without --registries.
func (a *app) artifacts() *artifact.Resolver {
	a.artOnce.Do(func() {
		servers := a.cfg.Containerd.pullThroughServers()
		if len(servers) == 0 {
			return
		}
		var auth upstream.Authorizer
		if a.auth != nil {
			auth = a.auth
		}
		a.art = artifact.New(artifact.Options{
			Registries: servers,
			Upstream:   a.upstream,
			Auth:       auth,
			Cache:      a.cache,
			Plan:       a.planner(faceFUSE),
			Logger:     a.log,
		})
	})
	return a.art
}
