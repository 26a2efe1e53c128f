package p2p

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
)

type dataServer struct {
	n   *Node
	ln  net.Listener
	srv *http.Server
	up  *uploads // admits and paces transfers to peers
	fan *fanout  // how many askers a whole blob goes to at once

	mu     sync.RWMutex
	stores []LocalStore
	tags   *Tags // answers /tags/ (nil: tag resolution off; see tags.go)
}

func (s *dataServer) addStore(st LocalStore) {
	s.mu.Lock()
	s.stores = append(s.stores, st)
	s.mu.Unlock()
}

type connPeerKey struct{}

// connPeer caches a connection's peer ID: computed once from the client
// certificate, reused by every request on the kept-alive connection.
type connPeer struct {
	once  sync.Once
	id    peer.ID
	err   error
	batch *batchConn // the TCP connection under the TLS one
}

func newDataServer(n *Node, addr string, stores []LocalStore) (*dataServer, error) {
	conf, err := baseTLS(n)
	if err != nil {
		return nil, err
	}
	// Refuse strangers during the handshake: a client must present a
	// libp2p-bound certificate of a peer we are connected to.
	conf.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
		p, err := peerFromCerts(raw)
		if err != nil {
			n.m.serveRequests.WithLabelValues("refused").Inc()
			return fmt.Errorf("%w: %v", errBadPeerCert, err)
		}
		if !n.connected(p) {
			n.m.serveRequests.WithLabelValues("refused").Inc()
			// The failed handshake is logged, rate-limited, by handshakeLog.
			n.log.Debug("refused peer data-plane connection", "peer", p.String(), "err", errNotMember)
			return errNotMember
		}
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on --peer-addr %s: %w", addr, err)
	}
	s := &dataServer{n: n, ln: tls.NewListener(batchListener{ln}, conf), stores: stores,
		up: newUploads(n.cfg.UploadStreams, n.cfg.UploadRate, n.m.uploadsInFlight), fan: &fanout{}}
	s.srv = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 5 * time.Second,
		MaxHeaderBytes:    maxPeerHeaderBytes,
		WriteTimeout:      2 * time.Minute,
		IdleTimeout:       2 * time.Minute,
		TLSNextProto:      map[string]func(*http.Server, *tls.Conn, http.Handler){}, // HTTP/1.1 only
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			cp := &connPeer{}
			if tc, ok := c.(*tls.Conn); ok {
				cp.batch, _ = tc.NetConn().(*batchConn)
			}
			return context.WithValue(ctx, connPeerKey{}, cp)
		},
		ErrorLog: log.New(&handshakeLog{log: n.log, m: n.m, every: handshakeWarnEvery, now: time.Now}, "", 0),
	}
	n.host.SetStreamHandler(addrProtocol, s.answerAddr)
	return s, nil
}

func (s *dataServer) addr() string { return s.ln.Addr().String() }

func (s *dataServer) serve() {
	if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		s.n.log.Error("peer data plane stopped", "err", err)
	}
}

func (s *dataServer) close() error {
	s.n.host.RemoveStreamHandler(addrProtocol)
	// A short grace for transfers in flight; askers resume a cut transfer
	// from another provider, so shutdown never waits long for them.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		return s.srv.Close()
	}
	return nil
}

// answerAddr tells a connected peer where our data plane listens. An
// unspecified listen IP is sent as ":port": the asker uses the IP it reached
// us on.
func (s *dataServer) answerAddr(st network.Stream) {
	defer st.Close()
	st.SetDeadline(time.Now().Add(5 * time.Second))
	host, port, _ := net.SplitHostPort(s.addr())
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = ""
	}
	// A second line tells the asker our zone; askers that read one line
	// only see the address.
	fmt.Fprintf(st, "%s\nzone=%s\n", net.JoinHostPort(host, port), s.n.Zone())
}

func (s *dataServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		s.refuse(w, "", errors.New("no client certificate"))
		return
	}
	cp, _ := r.Context().Value(connPeerKey{}).(*connPeer)
	if cp == nil {
		cp = &connPeer{}
	}
	cp.once.Do(func() {
		raw := make([][]byte, len(r.TLS.PeerCertificates))
		for i, c := range r.TLS.PeerCertificates {
			raw[i] = c.Raw
		}
		cp.id, cp.err = peerFromCerts(raw)
	})
	if cp.err != nil {
		s.refuse(w, "", cp.err)
		return
	}
	from := cp.id
	// Membership is checked per request too: a kept-alive connection must
	// not outlive the peer's membership.
	if !s.n.connected(from) {
		s.refuse(w, from, errNotMember)
		return
	}
	s.logRequest(r, from)
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		s.n.m.serveRequests.WithLabelValues("bad_request").Inc()
		http.Error(w, "only GET and HEAD", http.StatusMethodNotAllowed)
		return
	}
	if strings.HasPrefix(r.URL.Path, "/tags/") {
		s.serveTag(w, r, from)
		return
	}
	ks, ok := strings.CutPrefix(r.URL.Path, "/blobs/")
	k, err := blob.ParseDigest(ks)
	if !ok || err != nil {
		s.n.m.serveRequests.WithLabelValues("bad_request").Inc()
		s.n.log.Info("bad peer data-plane request", "peer", from.String(), "path", truncatePath(r.URL.Path))
		http.Error(w, "want /blobs/sha256:<hex>", http.StatusBadRequest)
		return
	}
	off, n, err := parsePeerRange(r.Header.Get("Range"))
	if err != nil {
		s.n.m.serveRequests.WithLabelValues("bad_request").Inc()
		http.Error(w, err.Error(), http.StatusRequestedRangeNotSatisfiable)
		return
	}
	if !s.up.admit(from) {
		s.n.m.serveRequests.WithLabelValues("busy").Inc()
		s.busy(w, "streams", time.Second)
		return
	}
	defer s.up.release(from)
	s.mu.RLock()
	stores := s.stores
	s.mu.RUnlock()
	for _, st := range stores {
		rc, size, err := st.OpenLocal(k, off, n)
		if errors.Is(err, blob.ErrNotFound) {
			continue
		}
		if err != nil {
			if size >= 0 && (off >= size || off < 0) {
				s.n.m.serveRequests.WithLabelValues("bad_request").Inc()
				w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
				http.Error(w, "range not satisfiable", http.StatusRequestedRangeNotSatisfiable)
				return
			}
			s.n.m.serveRequests.WithLabelValues("error").Inc()
			s.n.log.Warn("open local blob for peer", "key", k, "peer", from.String(), "err", err)
			http.Error(w, "local store error", http.StatusInternalServerError)
			return
		}
		// A range starting at or past the end is unsatisfiable (RFC 9110
		// 14.1.1); the one exception is the whole of an empty blob.
		if off >= size && !(off == 0 && size == 0) {
			rc.Close()
			s.n.m.serveRequests.WithLabelValues("bad_request").Inc()
			w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
			http.Error(w, "range not satisfiable", http.StatusRequestedRangeNotSatisfiable)
			return
		}
		if holdsWhole(st, k) {
			why := s.fan.admit(k, from, cleanZone(r.Header.Get(zoneHeader)), s.n.Zone(), r.Header.Get(insistHeader) != "", time.Now())
			if why != "" {
				rc.Close()
				s.n.m.serveRequests.WithLabelValues("fanout").Inc()
				s.busy(w, why, fanoutRetry)
				return
			}
			w.Header().Set(wholeHeader, "1")
		}
		start := time.Now()
		written, err := s.send(w, r, rc, k, from, off, n, size, cp.batch)
		s.n.recordServe(st, string(k), from.String(), start, written, err)
		return
	}
	// Say "don't have" at once; never fetch on the asker's behalf.
	s.n.m.serveRequests.WithLabelValues("not_found").Inc()
	w.Header().Set(notHeldHeader, "1")
	http.Error(w, "not held", http.StatusNotFound)
}

func (s *dataServer) send(w http.ResponseWriter, r *http.Request, rc io.ReadCloser, k blob.Key, from peer.ID, off, n, size int64, bc *batchConn) (int64, error) {
	defer rc.Close()
	if n < 0 || n > size-off {
		n = size - off
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Length", strconv.FormatInt(n, 10))
	if n > 0 {
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, off+n-1, size))
	} else {
		h.Set("Content-Range", fmt.Sprintf("bytes */%d", size))
	}
	w.WriteHeader(http.StatusPartialContent)
	if r.Method == http.MethodHead {
		s.n.m.serveRequests.WithLabelValues("ok").Inc()
		return 0, nil
	}
	// Counted as written, so a scrape sees the rate cap hold over any
	// window; the hooks (slow-ish) hear of the transfer once.
	rel := zoneRelation(s.n.Zone(), cleanZone(r.Header.Get(zoneHeader)))
	byZone, zoneTotal := s.n.m.servedByZone.WithLabelValues(rel), &s.n.zoneBytes.served[relationIndex(rel)]
	written, err := copyBatched(w, s.up.paced(r.Context(), rc), bc, func(b int64) {
		s.n.m.servedBytes.Add(float64(b))
		byZone.Add(float64(b))
		zoneTotal.Add(b)
		s.n.stats.add(Served, from, b)
	})
	s.n.peerHooks(Served, from, written)
	if err != nil {
		s.n.m.serveRequests.WithLabelValues("error").Inc()
		s.n.log.Debug("serving peer interrupted", "key", k, "peer", from.String(), "written", written, "err", err)
		return written, err
	}
	s.n.m.serveRequests.WithLabelValues("ok").Inc()
	return written, nil
}

// busy answers 503 at once: why is busyHeader's value, retry the delay
// the asker should wait before asking this node again.
func (s *dataServer) busy(w http.ResponseWriter, why string, retry time.Duration) {
	h := w.Header()
	h.Set("Retry-After", strconv.Itoa(max(1, int((retry+time.Second-1)/time.Second))))
	h.Set(retryMsHeader, strconv.FormatInt(retry.Milliseconds(), 10))
	h.Set(busyHeader, why)
	http.Error(w, "busy", http.StatusServiceUnavailable)
}

func (s *dataServer) refuse(w http.ResponseWriter, p peer.ID, err error) {
	s.n.m.serveRequests.WithLabelValues("refused").Inc()
	s.n.log.Warn("refused peer data-plane request", "peer", p.String(), "err", err)
	http.Error(w, "forbidden", http.StatusForbidden)
}

func truncatePath(p string) string {
	if len(p) > 120 {
		return p[:120] + "..."
	}
	return p
}
