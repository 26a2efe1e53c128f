package p2p

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/core/protocol"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/peerd-project/peerd/blob"
)

// LocalStore is something this node holds blobs in and may serve to peers:
// the content cache, later a containerd content store. OpenLocal returns
// bytes [off, off+n) (n < 0: to the end) and the blob's size, or an error
// wrapping blob.ErrNotFound at once when it does not hold all of them. It
// must never fetch.
type LocalStore interface {
	OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error)
}

// LocalStoreFunc adapts a function to LocalStore.
type LocalStoreFunc func(k blob.Key, off, n int64) (io.ReadCloser, int64, error)

func (f LocalStoreFunc) OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	return f(k, off, n)
}

const (
	// addrProtocol is the libp2p protocol a node answers with its data-plane
	// address, so providers need no second well-known port.
	addrProtocol = protocol.ID("/peerd/data-addr/1.0.0")
	// notHeldHeader marks a 404 that means "I don't hold these bytes".
	notHeldHeader = "X-Peerd-Not-Held"
	// maxServes bounds the transfers a node serves at once; past it askers
	// get 503 at once and move on to another provider rather than queue.
	maxServes = 128
	// maxPeerHeaderBytes bounds a peer request's header block: peers send
	// a request line and a few short headers, and a larger block gets 431
	// rather than up to a megabyte buffered per connection.
	maxPeerHeaderBytes = 8 << 10
)

// ErrRangeNotSatisfiable is a peer's 416: the range starts at or past the
// blob's end. Every provider would answer the same, so the asker stops
// rather than trying (and blaming) the others.
var ErrRangeNotSatisfiable = errors.New("range not satisfiable")

var errNotMember = errors.New("peer is not a connected member of the cluster")

// peerFromCerts extracts and checks the libp2p identity bound into a TLS
// certificate chain (the libp2p TLS handshake's certificate extension).
func peerFromCerts(raw [][]byte) (peer.ID, error) {
	chain := make([]*x509.Certificate, len(raw))
	for i, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return "", fmt.Errorf("peer certificate: %w", err)
		}
		chain[i] = c
	}
	pk, err := libp2ptls.PubKeyFromCertChain(chain)
	if err != nil {
		return "", fmt.Errorf("peer certificate: %w", err)
	}
	return peer.IDFromPublicKey(pk)
}

func baseTLS(n *Node) (*tls.Config, error) {
	id, err := libp2ptls.NewIdentity(n.cfg.Key)
	if err != nil {
		return nil, fmt.Errorf("peer TLS identity: %w", err)
	}
	conf, _ := id.ConfigForPeer("")
	conf = conf.Clone()
	// HTTP/1.1 is the ALPN value net/http serves without a TLSNextProto hook.
	conf.NextProtos = []string{"http/1.1"}
	// Peers move whole chunks: full-size records from the first byte (the
	// small ones that speed up a browser's first paint only add records,
	// syscalls and AEAD calls here).
	conf.DynamicRecordSizingDisabled = true
	conf.VerifyPeerCertificate = nil
	return conf, nil
}

// ---- server ----

type dataServer struct {
	n    *Node
	ln   net.Listener
	srv  *http.Server
	busy chan struct{} // bounds concurrent transfers

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
	s := &dataServer{n: n, ln: tls.NewListener(batchListener{ln}, conf), stores: stores, busy: make(chan struct{}, maxServes)}
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
	fmt.Fprintf(st, "%s\n", net.JoinHostPort(host, port))
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
	select {
	case s.busy <- struct{}{}:
		defer func() { <-s.busy }()
	default:
		s.n.m.serveRequests.WithLabelValues("busy").Inc()
		w.Header().Set("Retry-After", "1")
		http.Error(w, "busy", http.StatusServiceUnavailable)
		return
	}
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
		s.send(w, r, rc, k, from, off, n, size, cp.batch)
		return
	}
	// Say "don't have" at once; never fetch on the asker's behalf.
	s.n.m.serveRequests.WithLabelValues("not_found").Inc()
	w.Header().Set(notHeldHeader, "1")
	http.Error(w, "not held", http.StatusNotFound)
}

func (s *dataServer) send(w http.ResponseWriter, r *http.Request, rc io.ReadCloser, k blob.Key, from peer.ID, off, n, size int64, bc *batchConn) {
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
		return
	}
	written, err := copyBatched(w, rc, bc)
	s.n.peerBytes(Served, from, written)
	if err != nil {
		s.n.m.serveRequests.WithLabelValues("error").Inc()
		s.n.log.Debug("serving peer interrupted", "key", k, "peer", from.String(), "written", written, "err", err)
		return
	}
	s.n.m.serveRequests.WithLabelValues("ok").Inc()
}

// sendBufSize is the plaintext one write of a peer transfer hands to TLS.
// A transfer holds one such copy buffer and, on its connection, one batch
// of the records it becomes (sendBufSize + batchSlack): at most maxServes
// transfers at once hold 128 * 132 KiB ~ 16.5 MiB; idle buffers are pooled
// and go with the next GCs.
const sendBufSize = 64 << 10

// batchSlack covers the TLS 1.3 overhead of the records one write becomes
// (5 header + 1 type + 16 tag bytes per 16 KiB record).
const batchSlack = 1 << 10

var (
	sendBufPool  = sync.Pool{New: func() any { b := make([]byte, sendBufSize); return &b }}
	batchBufPool = sync.Pool{New: func() any { b := make([]byte, 0, sendBufSize+batchSlack); return &b }}
)

// copyBatched copies a transfer's body to w. Neither io.Copy shortcut
// applies (sendfile cannot cross TLS), so io.Copy would move the bytes in
// 32 KiB reads; this reads sendBufSize at a time and, when the connection
// batches (bc != nil), sends the TLS records each write becomes in one
// write(2) instead of one per 16 KiB record.
func copyBatched(w io.Writer, r io.Reader, bc *batchConn) (int64, error) {
	bp := sendBufPool.Get().(*[]byte)
	defer sendBufPool.Put(bp)
	buf := *bp
	if bc != nil {
		bc.start()
		defer bc.stop()
	}
	var written int64
	for {
		m, rerr := r.Read(buf)
		if m > 0 {
			k, err := w.Write(buf[:m])
			written += int64(k)
			if err == nil && bc != nil {
				err = bc.flush()
			}
			if err != nil {
				return written, err
			}
		}
		if rerr == io.EOF {
			return written, nil
		}
		if rerr != nil {
			return written, rerr
		}
	}
}

// batchListener hands out connections that can batch writes.
type batchListener struct{ net.Listener }

func (l batchListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &batchConn{Conn: c}, nil
}

// batchConn is the TCP connection under a peer's TLS server connection.
// crypto/tls writes every record (16 KiB at most) with its own write(2),
// and on loopback each costs a trip through the whole TCP stack on both
// ends. Between start and stop (one transfer's body) writes are gathered
// and sent at flush; everything else (handshake, headers of other
// responses, alerts) passes straight through. net/http serves one request
// at a time per connection, and the mutex orders the rare write from the
// TLS read side (a key update) with the handler's.
type batchConn struct {
	net.Conn
	mu  sync.Mutex
	buf *[]byte // non-nil while batching
}

func (c *batchConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.buf == nil {
		return c.Conn.Write(p)
	}
	b := *c.buf
	if len(b)+len(p) > cap(b) {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
		b = *c.buf
		if len(p) > cap(b) {
			return c.Conn.Write(p)
		}
	}
	*c.buf = append(b, p...)
	return len(p), nil
}

func (c *batchConn) flushLocked() error {
	if c.buf == nil || len(*c.buf) == 0 {
		return nil
	}
	// net.Conn.Write writes everything or returns an error.
	_, err := c.Conn.Write(*c.buf)
	*c.buf = (*c.buf)[:0]
	return err
}

func (c *batchConn) start() {
	c.mu.Lock()
	if c.buf == nil {
		c.buf = batchBufPool.Get().(*[]byte)
		*c.buf = (*c.buf)[:0]
	}
	c.mu.Unlock()
}

// flush sends what was gathered.
func (c *batchConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.flushLocked()
}

// stop sends what was gathered and ends batching. Bytes it could not send
// (the connection broke) are dropped with the connection's error: the
// asker sees a short body and resumes elsewhere.
func (c *batchConn) stop() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	err := c.flushLocked()
	if c.buf != nil {
		batchBufPool.Put(c.buf)
		c.buf = nil
	}
	return err
}

func (s *dataServer) refuse(w http.ResponseWriter, p peer.ID, err error) {
	s.n.m.serveRequests.WithLabelValues("refused").Inc()
	s.n.log.Warn("refused peer data-plane request", "peer", p.String(), "err", err)
	http.Error(w, "forbidden", http.StatusForbidden)
}

// parsePeerRange parses "bytes=a-b" or "bytes=a-" (the only forms peers
// send); no header means the whole blob.
func parsePeerRange(h string) (off, n int64, err error) {
	if h == "" {
		return 0, -1, nil
	}
	spec, ok := strings.CutPrefix(h, "bytes=")
	a, b, ok2 := strings.Cut(spec, "-")
	if !ok || !ok2 || strings.Contains(spec, ",") {
		return 0, 0, fmt.Errorf("bad range %q", h)
	}
	off, err = strconv.ParseInt(a, 10, 64)
	if err != nil || off < 0 {
		return 0, 0, fmt.Errorf("bad range %q", h)
	}
	if b == "" {
		return off, -1, nil
	}
	end, err := strconv.ParseInt(b, 10, 64)
	if err != nil || end < off || end-off+1 <= 0 { // the last: a length past int64
		return 0, 0, fmt.Errorf("bad range %q", h)
	}
	return off, end - off + 1, nil
}

func truncatePath(p string) string {
	if len(p) > 120 {
		return p[:120] + "..."
	}
	return p
}

// ---- client ----

type dataClient struct {
	n    *Node
	base *tls.Config

	mu    sync.Mutex
	peers map[peer.ID]*peerConn
}

// peerConn is the kept-alive HTTP transport to one peer: its TLS config
// accepts only that peer's identity.
type peerConn struct {
	addr     string
	client   *http.Client
	tr       *http.Transport
	lastUsed time.Time
}

func newDataClient(n *Node) *dataClient {
	base, err := baseTLS(n)
	if err != nil {
		// NewIdentity fails only for key types libp2p cannot sign certs with.
		n.log.Error("peer TLS identity", "err", err)
	}
	return &dataClient{n: n, base: base, peers: map[peer.ID]*peerConn{}}
}

func (c *dataClient) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for p, pc := range c.peers {
		pc.tr.CloseIdleConnections()
		delete(c.peers, p)
	}
}

// gc drops transports to peers unused for a while.
func (c *dataClient) gc(idle time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for p, pc := range c.peers {
		if time.Since(pc.lastUsed) > idle {
			pc.tr.CloseIdleConnections()
			delete(c.peers, p)
			c.n.host.ConnManager().UntagPeer(p, "peerd-data")
		}
	}
}

func (c *dataClient) forget(p peer.ID) {
	c.mu.Lock()
	pc := c.peers[p]
	delete(c.peers, p)
	c.mu.Unlock()
	if pc != nil {
		pc.tr.CloseIdleConnections()
	}
}

// conn returns the transport to p, connecting over libp2p and learning its
// data-plane address first when needed.
func (c *dataClient) conn(ctx context.Context, ai peer.AddrInfo) (*peerConn, error) {
	if c.base == nil {
		return nil, errors.New("no TLS identity")
	}
	if !c.n.connected(ai.ID) {
		if len(ai.Addrs) > 0 {
			c.n.host.Peerstore().AddAddrs(ai.ID, ai.Addrs, peerstore.TempAddrTTL)
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := c.n.host.Connect(cctx, peer.AddrInfo{ID: ai.ID})
		cancel()
		if err != nil {
			return nil, fmt.Errorf("connect: %w", err)
		}
	}
	c.mu.Lock()
	pc := c.peers[ai.ID]
	if pc != nil {
		pc.lastUsed = time.Now()
	}
	c.mu.Unlock()
	if pc != nil {
		return pc, nil
	}
	addr, err := c.askAddr(ctx, ai.ID)
	if err != nil {
		return nil, err
	}
	conf := c.base.Clone()
	want := ai.ID
	conf.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
		got, err := peerFromCerts(raw)
		if err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("peer data plane at %s is %s, want %s", addr, got, want)
		}
		return nil
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c.n.m.dials.Inc()
			return (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext(ctx, network, addr)
		},
		TLSClientConfig:       conf,
		TLSHandshakeTimeout:   3 * time.Second,
		ResponseHeaderTimeout: 10 * time.Second,
		MaxIdleConnsPerHost:   32,
		IdleConnTimeout:       90 * time.Second,
		DisableCompression:    true,
		ForceAttemptHTTP2:     false,
		ReadBufferSize:        256 << 10,
		WriteBufferSize:       16 << 10,
	}
	pc = &peerConn{addr: addr, tr: tr, client: &http.Client{Transport: tr}, lastUsed: time.Now()}
	c.mu.Lock()
	if old := c.peers[ai.ID]; old != nil {
		c.mu.Unlock()
		tr.CloseIdleConnections()
		return old, nil
	}
	c.peers[ai.ID] = pc
	c.mu.Unlock()
	// Keep the libp2p connection to a peer we read from: the peer checks it
	// on every request.
	c.n.host.ConnManager().TagPeer(ai.ID, "peerd-data", 20)
	return pc, nil
}

func (c *dataClient) askAddr(ctx context.Context, p peer.ID) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	st, err := c.n.host.NewStream(ctx, p, addrProtocol)
	if err != nil {
		return "", fmt.Errorf("ask data-plane address: %w", err)
	}
	defer st.Close()
	if dl, ok := ctx.Deadline(); ok {
		st.SetDeadline(dl)
	}
	line, err := bufio.NewReader(io.LimitReader(st, 256)).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read data-plane address: %w", err)
	}
	var remote net.IP
	if ip, err := manet.ToIP(st.Conn().RemoteMultiaddr()); err == nil {
		remote = ip
	}
	return peerDataAddr(line, remote)
}

// peerDataAddr checks the data-plane address a peer sent ("ip:port", or
// ":port" for the IP we reached it on, remote). Only a literal IP is taken:
// a name would make this node resolve and dial whatever a peer says. Nor
// are addresses no peer listens on taken (unspecified, multicast,
// broadcast, link-local, which holds the cloud metadata services), so a
// peer cannot point this node's requests at them.
func peerDataAddr(line string, remote net.IP) (string, error) {
	line = strings.TrimSpace(line)
	host, port, err := net.SplitHostPort(line)
	if err != nil {
		return "", fmt.Errorf("peer sent bad data-plane address %q", line)
	}
	if pn, err := strconv.Atoi(port); err != nil || pn < 1 || pn > 65535 || strconv.Itoa(pn) != port {
		return "", fmt.Errorf("peer sent bad data-plane port %q", port)
	}
	var ip netip.Addr
	if host == "" {
		a, ok := netip.AddrFromSlice(remote)
		if !ok {
			return "", errors.New("peer data-plane address: no IP for the peer's connection")
		}
		ip = a
	} else if ip, err = netip.ParseAddr(host); err != nil || ip.Zone() != "" {
		return "", fmt.Errorf("peer sent data-plane host %q: want an IP address", host)
	}
	ip = ip.Unmap()
	if ip.IsUnspecified() || ip.IsMulticast() || ip.IsLinkLocalUnicast() ||
		ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}) ||
		ip == awsMetadataV6 {
		return "", fmt.Errorf("peer sent data-plane address %s: not an address a peer listens on", ip)
	}
	return net.JoinHostPort(ip.String(), port), nil
}

// awsMetadataV6 is a cloud metadata service's IPv6 address, which is not
// link-local.
var awsMetadataV6 = netip.MustParseAddr("fd00:ec2::254")

// GetRange reads bytes [off, off+n) of k from peer ai. It returns the body
// and the blob's total size; a peer that does not hold the bytes yields an
// error wrapping blob.ErrNotFound.
func (c *dataClient) GetRange(ctx context.Context, ai peer.AddrInfo, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	pc, err := c.conn(ctx, ai)
	if err != nil {
		c.n.m.peerErrors.WithLabelValues("dial").Inc()
		return nil, -1, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+pc.addr+"/blobs/"+string(k), nil)
	if err != nil {
		return nil, -1, err
	}
	if n >= 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	} else {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", off))
	}
	resp, err := pc.client.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			c.n.m.peerErrors.WithLabelValues("dial").Inc()
			c.forget(ai.ID) // its address may have changed
		}
		return nil, -1, err
	}
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusNotFound:
		resp.Body.Close()
		c.n.m.peerErrors.WithLabelValues("not_found").Inc()
		return nil, -1, fmt.Errorf("peer %s does not hold %s: %w", ai.ID, k, blob.ErrNotFound)
	case http.StatusRequestedRangeNotSatisfiable:
		io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		c.n.m.peerErrors.WithLabelValues("status").Inc()
		return nil, -1, fmt.Errorf("peer %s: %s offset %d (%s): %w", ai.ID, k, off, resp.Header.Get("Content-Range"), ErrRangeNotSatisfiable)
	default:
		io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		c.n.m.peerErrors.WithLabelValues("status").Inc()
		return nil, -1, fmt.Errorf("peer %s answered %s", ai.ID, resp.Status)
	}
	total, start, err := parseContentRange(resp.Header.Get("Content-Range"))
	if err != nil || start != off {
		resp.Body.Close()
		c.n.m.peerErrors.WithLabelValues("status").Inc()
		return nil, -1, fmt.Errorf("peer %s: bad Content-Range %q", ai.ID, resp.Header.Get("Content-Range"))
	}
	return &countingBody{rc: resp.Body, n: c.n, p: ai.ID}, total, nil
}

// parseContentRange parses "bytes a-b/total" (or "bytes */total").
func parseContentRange(h string) (total, start int64, err error) {
	spec, ok := strings.CutPrefix(h, "bytes ")
	rng, tot, ok2 := strings.Cut(spec, "/")
	if !ok || !ok2 {
		return -1, -1, fmt.Errorf("bad Content-Range %q", h)
	}
	total, err = strconv.ParseInt(tot, 10, 64)
	if err != nil || total < 0 {
		return -1, -1, fmt.Errorf("bad Content-Range %q", h)
	}
	if rng == "*" {
		return total, 0, nil
	}
	// The range must lie inside the blob the peer states the size of.
	a, b, ok := strings.Cut(rng, "-")
	start, err = strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	if !ok || err != nil || err2 != nil || start < 0 || end < start || end >= total {
		return -1, -1, fmt.Errorf("bad Content-Range %q", h)
	}
	return total, start, nil
}

// countingBody counts received bytes in the metrics as they arrive and tells
// the OnPeerBytes hooks once per response (hooks may be slow-ish: events).
type countingBody struct {
	rc    io.ReadCloser
	n     *Node
	p     peer.ID
	total int64
	once  sync.Once
}

func (b *countingBody) Read(p []byte) (int, error) {
	m, err := b.rc.Read(p)
	if m > 0 {
		b.total += int64(m)
		b.n.m.receivedBytes.Add(float64(m))
	}
	return m, err
}

func (b *countingBody) Close() error {
	b.once.Do(func() { b.n.peerHooks(Received, b.p, b.total) })
	return b.rc.Close()
}
