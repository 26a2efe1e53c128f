// Command e2eorigin is the plain HTTP file origin of the e2e cluster: it serves
// the files under -dir with Range support, like a blob store behind a
// registry's storage redirect. It runs inside the origin network namespace
// (ip netns exec), so its egress crosses the throttled interface.
package main

import (
	"context"
	"errors"
	"flag"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

func main() {
	addr := flag.String("addr", "0.0.0.0:8080", "listen address")
	dir := flag.String("dir", "", "folder whose files are served (required)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if *dir == "" {
		log.Error("-dir is required")
		os.Exit(2)
	}
	root, err := filepath.Abs(*dir)
	if err != nil {
		log.Error("resolve -dir", "err", err)
		os.Exit(2)
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Error("listen", "addr", *addr, "err", err)
		os.Exit(1)
	}
	// The handler is the server's root on purpose: http.ServeMux would answer
	// a path holding "//" (as storage URLs do) with a redirect to the cleaned
	// path, and the origin must serve it as the client asked.
	srv := &http.Server{
		Handler:           &origin{root: root, log: log},
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       time.Minute,
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	log.Info("serving", "addr", ln.Addr().String(), "dir", root)
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error("serve", "err", err)
		os.Exit(1)
	}
}

type origin struct {
	root string
	log  *slog.Logger
}

func (o *origin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/healthz" {
		w.WriteHeader(http.StatusOK)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	// Clean only to find the file; "//" inside the path maps to the same file.
	rel := path.Clean("/" + r.URL.Path)
	if strings.Contains(rel, "..") {
		http.Error(w, "bad path", http.StatusBadRequest)
		return
	}
	name := filepath.Join(o.root, filepath.FromSlash(rel))
	f, err := os.Open(name)
	if err != nil {
		o.log.Info("not found", "path", r.URL.Path)
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.IsDir() {
		http.NotFound(w, r)
		return
	}
	o.log.Debug("serve", "path", r.URL.Path, "range", r.Header.Get("Range"))
	w.Header().Set("Content-Type", "application/octet-stream")
	// ServeContent answers Range (206, Content-Range, 416) and HEAD.
	http.ServeContent(w, r, "", st.ModTime(), f)
}
