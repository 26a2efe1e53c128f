package p2p

import (
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p-kad-dht/records"
	"github.com/libp2p/go-libp2p/core/host"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/prometheus/client_golang/prometheus"
)

// DefaultPeerAddr derives the data-plane address from the libp2p listen
// multiaddr: same IP, port + 1 (0 stays 0).
func DefaultPeerAddr(listen string) (string, error) {
	m, err := ma.NewMultiaddr(listen)
	if err != nil {
		return "", fmt.Errorf("--p2p-addr %q: %w", listen, err)
	}
	na, err := manet.ToNetAddr(m)
	if err != nil {
		return "", fmt.Errorf("--p2p-addr %q: %w", listen, err)
	}
	ta, ok := na.(*net.TCPAddr)
	if !ok {
		return "", fmt.Errorf("--p2p-addr %q: want a /tcp address", listen)
	}
	port := 0
	if ta.Port != 0 {
		port = ta.Port + 1
	}
	return net.JoinHostPort(ta.IP.String(), strconv.Itoa(port)), nil
}

// newHost starts the libp2p host: TCP only, limits scaled to the machine,
// advertising exactly the listen address.
func newHost(cfg Config, listen ma.Multiaddr, reg prometheus.Registerer) (host.Host, error) {
	// Limits scaled to the machine (memory, file descriptors), with the
	// defaults for libp2p's own services; the DHT and our small address
	// protocol fit well inside the per-peer defaults.
	limits := rcmgr.DefaultLimits
	libp2p.SetDefaultServiceLimits(&limits)
	rcmgr.MustRegisterWith(reg)
	str, err := rcmgr.NewStatsTraceReporter()
	if err != nil {
		return nil, err
	}
	scaled := limits.AutoScale()
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(scaled), rcmgr.WithTraceReporter(str))
	if err != nil {
		return nil, fmt.Errorf("p2p resource manager: %w", err)
	}
	low, high := connWatermarks(scaled)
	cm, err := connmgr.NewConnManager(low, high, connmgr.WithGracePeriod(time.Minute))
	if err != nil {
		rm.Close()
		return nil, err
	}
	opts := []libp2p.Option{
		libp2p.Identity(cfg.Key),
		libp2p.ListenAddrs(listen),
		// TCP only: a private network key works with TCP, and a LAN needs
		// neither QUIC's NAT traversal nor WebRTC/WebTransport.
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.ResourceManager(rm),
		libp2p.ConnectionManager(cm),
		libp2p.DisableRelay(),
		libp2p.DisableIdentifyAddressDiscovery(),
		libp2p.PrometheusRegisterer(reg),
		libp2p.UserAgent(cfg.UserAgent),
		libp2p.WithDialTimeout(5 * time.Second),
		// Advertise exactly what we listen on: a node bound to 127.0.0.3
		// must never be reached through another address of the machine.
		libp2p.AddrsFactory(func(addrs []ma.Multiaddr) []ma.Multiaddr { return listenOnly(listen, addrs) }),
	}
	if cfg.SwarmKey != nil {
		opts = append(opts, libp2p.PrivateNetwork(cfg.SwarmKey))
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("start libp2p host on %s: %w", cfg.ListenAddr, err)
	}
	return h, nil
}

// newDHT starts the node's Kademlia DHT on its host: a server, on peerd's
// own protocol prefix, carrying provider records only.
func (n *Node) newDHT() (*dht.IpfsDHT, error) {
	validity := 3 * n.cfg.ReprovideInterval
	if validity < 10*time.Minute {
		validity = 10 * time.Minute
	}
	return dht.New(n.host,
		dht.Mode(dht.ModeServer),
		dht.ProtocolPrefix(ProtocolPrefix),
		dht.DisableValues(),
		dht.BootstrapPeersFunc(n.bootstrapPeers),
		// Provider records outlive a missed reprovide or two, and no more:
		// a node that stopped holding a blob drops out of lookups soon.
		dht.ProviderManagerOpts(records.ProvideValidity(validity), records.ProviderAddrTTL(validity)),
		// Indexed by blob: a provider query costs the records of that blob,
		// not a copy of every record stored (see recordStore).
		dht.ProviderDatastore(newRecordStore(maxProviderRecords, func(c int) { n.m.records.Set(float64(c)) }, n.m.refused.Inc)),
	)
}

// listenOnly keeps the host's addresses on the IP we listen on (all of them
// when listening on an unspecified address).
func listenOnly(listen ma.Multiaddr, addrs []ma.Multiaddr) []ma.Multiaddr {
	ip, err := manet.ToIP(listen)
	if err != nil || ip.IsUnspecified() {
		return addrs
	}
	var out []ma.Multiaddr
	for _, a := range addrs {
		if aip, err := manet.ToIP(a); err == nil && aip.Equal(ip) {
			out = append(out, a)
		}
	}
	return out
}

// connWatermarks are the connection manager's low and high water marks:
// at most 400 connections, and below the resource manager's limit on
// inbound connections (252 on a 24 GiB machine, 80 on 2 GiB). With the
// high mark above that limit, a node many peers know (a bootstrap node,
// one that served a popular blob) fills its inbound connections and
// stays there: the connection manager never trims, because the total is
// under its high mark, and the resource manager resets every new peer
// during the handshake. In a 500-node network that refused the nodes that
// tried to join through such a node, and lookups that needed to reach it.
func connWatermarks(l rcmgr.ConcreteLimitConfig) (low, high int) {
	high = 400
	if in := int(l.ToPartialLimitConfig().System.ConnsInbound); in > 0 {
		high = min(high, in*3/4)
	}
	high = max(high, 4)
	return high / 2, high
}
