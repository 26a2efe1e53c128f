package p2p

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/peerd-project/peerd/internal/reliability"
)

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) lines(substr string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, l := range strings.Split(s.b.String(), "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return out
}

// failHandshake fails one TLS handshake on addr, as a client without a
// certificate (even) or one sending bytes that are not TLS (odd; every
// fourth an HTTP request).
func failHandshake(t *testing.T, addr string, i int) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if i%2 == 1 {
		if i%4 == 1 {
			c.Write([]byte("\x00\x01\x02 not a TLS record at all\n"))
		} else {
			c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		}
		io.Copy(io.Discard, c) // the server closes
		return
	}
	tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true})
	if err := tc.Handshake(); err == nil {
		// TLS 1.3: the client finishes first; the server's alert arrives on read.
		if _, err := tc.Read(make([]byte, 1)); err == nil {
			t.Fatal("a client without a certificate was served")
		}
	}
}

// TestFailedHandshakesAreCountedAndLogBounded fails 1,000 TLS handshakes on
// the peer port: every one is counted by reason, and the log gets one WARN
// per window with the number of failures it did not log.
func TestFailedHandshakesAreCountedAndLogBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a libp2p host")
	}
	key, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	reg := prometheus.NewRegistry()
	n, err := New(context.Background(), Config{
		Key:               key,
		ListenAddr:        "/ip4/127.0.0.1/tcp/0",
		ResolveTimeout:    time.Second,
		ReprovideInterval: time.Hour,
		Stores:            []LocalStore{&memStore{}},
		Registerer:        reg,
		Logger:            slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	h := n.server.srv.ErrorLog.Writer().(*handshakeLog)
	var clockMu sync.Mutex
	clock := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	h.mu.Lock()
	h.now = func() time.Time { clockMu.Lock(); defer clockMu.Unlock(); return clock }
	h.mu.Unlock()

	failures := func() float64 {
		var sum float64
		for _, r := range []string{"no_certificate", "bad_certificate", "not_member", "not_tls", "timeout", "closed", "other"} {
			sum += counter(t, reg, "peerd_p2p_tls_handshake_failures_total", r)
		}
		return sum
	}
	const total = 1000
	// All but the last within one window, then the clock moves past it.
	for i := 0; i < total-1; i++ {
		failHandshake(t, n.PeerAddr(), i)
	}
	waitFor(t, fmt.Sprintf("%d failed handshakes counted", total-1), func() bool { return failures() == total-1 })
	clockMu.Lock()
	clock = clock.Add(handshakeWarnEvery)
	clockMu.Unlock()
	failHandshake(t, n.PeerAddr(), total-1)
	waitFor(t, fmt.Sprintf("%d failed handshakes counted", total), func() bool { return failures() == total })

	warns := logs.lines("level=WARN")
	if len(warns) != 2 {
		t.Fatalf("%d WARN lines for %d failed handshakes in two windows, want 2:\n%s", len(warns), total, strings.Join(warns[:min(len(warns), 5)], "\n"))
	}
	for _, w := range warns {
		if !strings.Contains(w, "failed TLS handshake on the peer data-plane port") {
			t.Fatalf("unexpected WARN: %s", w)
		}
	}
	if !strings.Contains(warns[1], fmt.Sprintf("suppressed=%d", total-2)) {
		t.Fatalf("second WARN does not count the %d failures not logged: %s", total-2, warns[1])
	}
	noCert := counter(t, reg, "peerd_p2p_tls_handshake_failures_total", "no_certificate")
	notTLS := counter(t, reg, "peerd_p2p_tls_handshake_failures_total", "not_tls")
	if noCert != total/2 || notTLS != total/2 {
		t.Fatalf("reasons: no_certificate %v, not_tls %v; want %d each", noCert, notTLS, total/2)
	}
	reliability.Record(t, reliability.Row{
		Area:    "probe",
		Case:    fmt.Sprintf("%d failed TLS handshakes on the peer port (no client certificate, not TLS)", total),
		Outcome: fmt.Sprintf("%d WARN lines (one per %s, with the count not logged), metric %v", len(warns), handshakeWarnEvery, failures()),
		Figure:  fmt.Sprintf("no_certificate %v, not_tls %v", noCert, notTLS),
	})
}
