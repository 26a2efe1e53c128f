package p2p

import (
	"errors"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// handshakeWarnEvery bounds the WARN lines for failed TLS handshakes on the
// peer port: anyone who can reach the port can fail handshakes at will, and
// one line each would let them flood the log.
const handshakeWarnEvery = 10 * time.Second

// errBadPeerCert wraps a client certificate that binds no libp2p key.
var errBadPeerCert = errors.New("client certificate is not a libp2p peer certificate")

// handshakeLog is the data server's error log. Failed TLS handshakes are
// counted by reason and logged at most once per every, with the number of
// failures not logged since the previous line; other lines are WARNs.
type handshakeLog struct {
	log   *slog.Logger
	m     *metrics
	every time.Duration
	now   func() time.Time

	mu         sync.Mutex
	last       time.Time // of the latest WARN line
	suppressed int
}

// handshakePrefix starts net/http's line for a failed TLS handshake.
const handshakePrefix = "http: TLS handshake error from "

func (h *handshakeLog) Write(p []byte) (int, error) {
	line := strings.TrimRight(string(p), "\n")
	rest, ok := strings.CutPrefix(line, handshakePrefix)
	if !ok {
		h.log.Warn(line)
		return len(p), nil
	}
	from, msg, _ := strings.Cut(rest, ": ")
	reason := handshakeReason(msg)
	h.m.handshakes.WithLabelValues(reason).Inc()
	h.mu.Lock()
	now := h.now()
	if !h.last.IsZero() && now.Sub(h.last) < h.every {
		h.suppressed++
		h.mu.Unlock()
		return len(p), nil
	}
	h.last = now
	suppressed := h.suppressed
	h.suppressed = 0
	h.mu.Unlock()
	h.log.Warn("failed TLS handshake on the peer data-plane port", "from", from, "reason", reason, "err", msg,
		"suppressed", suppressed, "suppressed_over", h.every.String(), "metric", "peerd_p2p_tls_handshake_failures_total")
	return len(p), nil
}

// handshakeReason classifies a failed handshake by its error text (net/http
// hands the error over only as text).
func handshakeReason(msg string) string {
	switch {
	case strings.Contains(msg, errNotMember.Error()):
		return "not_member"
	case strings.Contains(msg, errBadPeerCert.Error()):
		return "bad_certificate"
	case strings.Contains(msg, "didn't provide a certificate"):
		return "no_certificate"
	case strings.Contains(msg, "does not look like a TLS handshake"), strings.Contains(msg, "HTTP request to an HTTPS server"):
		return "not_tls"
	case strings.Contains(msg, "timeout"):
		return "timeout"
	case strings.Contains(msg, "EOF"), strings.Contains(msg, "connection reset"), strings.Contains(msg, "broken pipe"):
		return "closed"
	}
	return "other"
}
