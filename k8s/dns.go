package k8s

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/sec"
	"github.com/multiformats/go-multiaddr"
	"github.com/multiformats/go-multihash"
)

// DNSOptions configure DNS bootstrap.
type DNSOptions struct {
	// Name is a headless Service's DNS name, optionally with ":port". Without
	// a port, the node's own libp2p TCP port is used: a DaemonSet listens on
	// the same port everywhere.
	Name string
	// Resolver defaults to net.DefaultResolver.
	Resolver *net.Resolver
	// LookupTimeout bounds one DNS lookup (5s); ProbeTimeout one peer probe (5s).
	LookupTimeout, ProbeTimeout time.Duration
	// MaxProbes bounds how many addresses one round probes (3).
	MaxProbes int
	Logger    *slog.Logger
}

// DNS is the Discoverer of mode "dns": it resolves a headless Service to the
// pods' IPs and learns each pod's peer ID by dialing it. No Kubernetes API
// access is needed.
type DNS struct {
	host Host
	opts DNSOptions
	name string
	port int // 0: the node's own TCP port
}

// NewDNS checks opts.
func NewDNS(h Host, opts DNSOptions) (*DNS, error) {
	if opts.Name == "" {
		return nil, errors.New("dns bootstrap: no --dns-name")
	}
	name, port := opts.Name, 0
	if host, p, err := net.SplitHostPort(opts.Name); err == nil {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("dns bootstrap: bad port in %q", opts.Name)
		}
		name, port = host, n
	}
	if opts.Resolver == nil {
		opts.Resolver = net.DefaultResolver
	}
	if opts.LookupTimeout <= 0 {
		opts.LookupTimeout = 5 * time.Second
	}
	if opts.ProbeTimeout <= 0 {
		opts.ProbeTimeout = 5 * time.Second
	}
	if opts.MaxProbes <= 0 {
		opts.MaxProbes = 3
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &DNS{host: h, opts: opts, name: name, port: port}, nil
}

func (d *DNS) Name() string             { return "dns" }
func (d *DNS) Changed() <-chan struct{} { return nil }

// Discover resolves the name, drops the node's own IPs, and probes a few of
// the rest for their peer IDs.
func (d *DNS) Discover(ctx context.Context) ([]peer.AddrInfo, error) {
	port := d.port
	if port == 0 {
		port = ownTCPPort(d.host.Addrs())
		if port == 0 {
			return nil, errors.New("the node listens on no TCP address, and --dns-name has no port")
		}
	}
	lctx, cancel := context.WithTimeout(ctx, d.opts.LookupTimeout)
	ips, err := d.opts.Resolver.LookupNetIP(lctx, "ip", d.name)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", d.name, err)
	}
	own := ownIPs(d.host.Addrs())
	var addrs []multiaddr.Multiaddr
	for _, ip := range ips {
		ip = ip.Unmap()
		if own[ip] || ip.IsUnspecified() {
			continue
		}
		ma, err := tcpAddr(ip, port)
		if err != nil {
			continue
		}
		addrs = append(addrs, ma)
	}
	if len(addrs) == 0 {
		return nil, nil // only this node answers to the name: alone
	}
	mrand.Shuffle(len(addrs), func(i, j int) { addrs[i], addrs[j] = addrs[j], addrs[i] })
	if len(addrs) > d.opts.MaxProbes {
		addrs = addrs[:d.opts.MaxProbes]
	}
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		out  []peer.AddrInfo
		errs []error
	)
	self := d.host.ID()
	for _, a := range addrs {
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, d.opts.ProbeTimeout)
			defer cancel()
			id, err := ProbePeerID(pctx, d.host, a)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				errs = append(errs, err)
			case id != self:
				out = append(out, peer.AddrInfo{ID: id, Addrs: []multiaddr.Multiaddr{a}})
			}
		})
	}
	wg.Wait()
	if len(out) == 0 && len(errs) > 0 {
		return nil, fmt.Errorf("%s: %w", d.name, errors.Join(errs...))
	}
	return out, nil
}

// ProbePeerID learns the peer ID listening at addr. libp2p cannot dial
// without naming the peer, so it names a random one: the remote's security
// handshake then fails with the ID it really has. That ID only picks whom
// to dial next; the real connection authenticates it like any other.
func ProbePeerID(ctx context.Context, h Host, addr multiaddr.Multiaddr) (peer.ID, error) {
	decoy, err := randomPeerID()
	if err != nil {
		return "", err
	}
	err = h.Connect(ctx, peer.AddrInfo{ID: decoy, Addrs: []multiaddr.Multiaddr{addr}})
	var mismatch sec.ErrPeerIDMismatch
	switch {
	case errors.As(err, &mismatch) && mismatch.Actual != "":
		return mismatch.Actual, nil
	case err == nil:
		// Something accepted a peer ID that cannot be its own.
		return "", fmt.Errorf("probe %s: the remote claimed a random peer ID", addr)
	}
	return "", fmt.Errorf("probe %s: %w", addr, err)
}

func randomPeerID() (peer.ID, error) {
	var b [32]byte
	rand.Read(b[:])
	mh, err := multihash.Sum(b[:], multihash.SHA2_256, -1)
	if err != nil {
		return "", err
	}
	return peer.ID(mh), nil
}

func tcpAddr(ip netip.Addr, port int) (multiaddr.Multiaddr, error) {
	proto := "ip4"
	if ip.Is6() {
		proto = "ip6"
	}
	return multiaddr.NewMultiaddr(fmt.Sprintf("/%s/%s/tcp/%d", proto, ip, port))
}

func ownTCPPort(addrs []multiaddr.Multiaddr) int {
	for _, a := range addrs {
		if v, err := a.ValueForProtocol(multiaddr.P_TCP); err == nil {
			if n, err := strconv.Atoi(v); err == nil && n > 0 {
				return n
			}
		}
	}
	return 0
}

func ownIPs(addrs []multiaddr.Multiaddr) map[netip.Addr]bool {
	own := map[netip.Addr]bool{}
	for _, a := range addrs {
		for _, p := range []int{multiaddr.P_IP4, multiaddr.P_IP6} {
			if v, err := a.ValueForProtocol(p); err == nil {
				if ip, err := netip.ParseAddr(v); err == nil {
					own[ip.Unmap()] = true
				}
			}
		}
	}
	return own
}
