package p2p

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
)

// serveTag answers GET /tags/<registry>/<repo>:<tag> from the local image
// store only.
func (s *dataServer) serveTag(w http.ResponseWriter, r *http.Request, from peer.ID) {
	s.mu.RLock()
	t := s.tags
	s.mu.RUnlock()
	if t == nil {
		w.Header().Set(notHeldHeader, "1")
		http.Error(w, "tag resolution is off on this node", http.StatusNotFound)
		return
	}
	t.answer(w, r, from)
}

func (t *Tags) answer(w http.ResponseWriter, r *http.Request, from peer.ID) {
	name := strings.TrimPrefix(r.URL.Path, "/tags/")
	ref, err := ParseTagName(name)
	if err != nil || r.URL.RawPath != "" {
		t.m.answers.WithLabelValues("bad_request").Inc()
		t.lg.Info("bad peer tag request", "peer", from.String(), "path", truncatePath(r.URL.Path), "err", err)
		http.Error(w, "want /tags/<registry>/<repo>:<tag>", http.StatusBadRequest)
		return
	}
	notHeld := func(result, why string) {
		t.m.answers.WithLabelValues(result).Inc()
		w.Header().Set(notHeldHeader, "1")
		http.Error(w, why, http.StatusNotFound)
	}
	if !t.Listed(ref.Registry) {
		t.lg.Info("refused a peer's tag request for an unlisted registry", "peer", from.String(), "tag", ref.String())
		notHeld("refused", "registry not served")
		return
	}
	if t.opts.Local == nil {
		notHeld("not_found", "no image store")
		return
	}
	select {
	case t.busy <- struct{}{}:
		defer func() { <-t.busy }()
	default:
		t.m.answers.WithLabelValues("busy").Inc()
		w.Header().Set("Retry-After", "1")
		http.Error(w, "busy", http.StatusServiceUnavailable)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), tagLocalTimeout)
	defer cancel()
	tt, err := t.opts.Local(ctx, ref)
	if err == nil {
		err = tt.check()
	}
	if errors.Is(err, blob.ErrNotFound) {
		notHeld("not_found", "not held")
		return
	}
	if err != nil {
		t.m.answers.WithLabelValues("error").Inc()
		t.lg.Warn("resolve tag for a peer", "peer", from.String(), "tag", ref.String(), "err", err)
		http.Error(w, "local image store error", http.StatusInternalServerError)
		return
	}
	b, _ := json.Marshal(tt)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write(b)
	}
	t.m.answers.WithLabelValues("ok").Inc()
}
