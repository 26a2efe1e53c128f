package p2p

import (
	"log/slog"
	"net/http"
	"slices"
	"strings"

	"github.com/libp2p/go-libp2p/core/peer"
)

// logRequest logs a peer request at debug level with its header names,
// never their values: an operator (and a test) can see that nothing but
// the peer protocol's headers arrives, and no secret reaches the log.
func (s *dataServer) logRequest(r *http.Request, from peer.ID) {
	if !s.n.log.Enabled(r.Context(), slog.LevelDebug) {
		return
	}
	s.n.log.Debug("peer data-plane request", "peer", from.String(), "method", r.Method,
		"path", truncatePath(r.URL.Path), "headers", headerNames(r.Header))
}

// headerNames lists a request's header names, sorted.
func headerNames(h http.Header) string {
	names := make([]string, 0, len(h))
	for name := range h {
		names = append(names, name)
	}
	slices.Sort(names)
	return strings.Join(names, ",")
}
