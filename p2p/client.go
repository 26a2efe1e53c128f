package p2p

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/peerd-project/peerd/blob"
)

type dataClient struct {
	n    *Node
	base *tls.Config

	mu     sync.Mutex
	peers  map[peer.ID]*peerConn
	asking map[peer.ID]bool // learnZones in flight
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
	br := bufio.NewReader(io.LimitReader(st, 256))
	line, err := br.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read data-plane address: %w", err)
	}
	// An optional second line names the peer's zone (older peers send none).
	if z, err := br.ReadString('\n'); err == nil {
		if v, ok := strings.CutPrefix(strings.TrimSpace(z), "zone="); ok {
			c.n.zones.learn(p, cleanZone(v))
		}
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
		if ctx.Err() == nil { // not a caller that gave up
			c.n.m.peerErrors.WithLabelValues("dial").Inc()
		}
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
	if z := c.n.Zone(); z != "" {
		req.Header.Set(zoneHeader, z)
	}
	if insisting(ctx) {
		req.Header.Set(insistHeader, "1")
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
		// Read the short reason to its end: a body closed early takes its
		// connection with it, and the next ask would pay a TLS handshake.
		io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		c.n.m.peerErrors.WithLabelValues("not_found").Inc()
		return nil, -1, fmt.Errorf("peer %s does not hold %s: %w", ai.ID, k, blob.ErrNotFound)
	case http.StatusServiceUnavailable:
		io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		c.n.m.busyReceived.Inc()
		return nil, -1, &BusyError{Peer: ai.ID, Reason: resp.Header.Get(busyHeader),
			RetryAfter: retryAfter(resp.Header.Get("Retry-After"), resp.Header.Get(retryMsHeader))}
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
	return &countingBody{rc: resp.Body, n: c.n, p: ai.ID, whole: resp.Header.Get(wholeHeader) != ""}, total, nil
}

// countingBody counts received bytes in the metrics as they arrive and tells
// the OnPeerBytes hooks once per response (hooks may be slow-ish: events).
type countingBody struct {
	rc    io.ReadCloser
	n     *Node
	p     peer.ID
	total int64
	once  sync.Once
	whole bool // the holder served from a whole, verified copy
}

var _ wholeBody = (*countingBody)(nil)

func (b *countingBody) fromWhole() bool { return b.whole }

func (b *countingBody) Read(p []byte) (int, error) {
	m, err := b.rc.Read(p)
	if m > 0 {
		b.total += int64(m)
		b.n.m.receivedBytes.Add(float64(m))
	}
	return m, err
}

func (b *countingBody) Close() error {
	b.once.Do(func() {
		b.n.stats.add(Received, b.p, b.total)
		rel := b.n.zones.relation(b.p)
		b.n.m.receivedByZone.WithLabelValues(rel).Add(float64(b.total))
		b.n.zoneBytes.received[relationIndex(rel)].Add(b.total)
		b.n.peerHooks(Received, b.p, b.total)
	})
	return b.rc.Close()
}
