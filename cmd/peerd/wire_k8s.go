package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/k8s"
	"github.com/peerd-project/peerd/p2p"
	"k8s.io/klog/v2"
)

// k8sConfig holds the flags of the Kubernetes integration (bootstrap modes, Events).
type k8sConfig struct {
	BootstrapMode string
	Kubeconfig    string
	NodeName      string
	Namespace     string
	LeaseName     string
	LeaseDuration time.Duration
	DNSName       string
}

const (
	modeStatic = "static"
	modeLease  = "k8s-lease"
	modeDNS    = "dns"
)

// saNamespaceFile is where a pod's service account namespace is mounted.
const saNamespaceFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

func registerK8sFlags(fs *flag.FlagSet, c *k8sConfig) {
	fs.StringVar(&c.BootstrapMode, "bootstrap-mode", modeStatic, "how the node finds its first peers: static (only --bootstrap), k8s-lease (the leader of a Lease in --namespace) or dns (the IPs behind --dns-name)")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig for the Kubernetes API; empty: the pod's service account, or none outside a pod (then Events are off)")
	fs.StringVar(&c.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's Kubernetes Node name: the Lease identity and the object Events are about (default $NODE_NAME, else the hostname)")
	fs.StringVar(&c.Namespace, "namespace", defaultNamespace(), "namespace of the bootstrap Lease; the default comes from $POD_NAMESPACE or the pod's service account")
	fs.StringVar(&c.LeaseName, "lease-name", "peerd-bootstrap", "name of the bootstrap Lease (k8s-lease mode)")
	fs.DurationVar(&c.LeaseDuration, "lease-duration", 15*time.Second, "how long a vanished leader keeps the Lease before another node takes over (k8s-lease mode)")
	fs.StringVar(&c.DNSName, "dns-name", "", "headless Service name resolving to the peers' IPs, optionally with :port (default port: this node's libp2p TCP port) (dns mode)")
}

func defaultNamespace() string {
	if ns := os.Getenv("POD_NAMESPACE"); ns != "" {
		return ns
	}
	if b, err := os.ReadFile(saNamespaceFile); err == nil && strings.TrimSpace(string(b)) != "" {
		return strings.TrimSpace(string(b))
	}
	return "default"
}

func (c *k8sConfig) validate() error {
	var errs []error
	switch c.BootstrapMode {
	case modeStatic:
	case modeLease:
		if c.Namespace == "" || c.LeaseName == "" {
			errs = append(errs, errors.New("--bootstrap-mode k8s-lease needs --namespace and --lease-name"))
		}
		if c.LeaseDuration < 3*time.Second || c.LeaseDuration > 5*time.Minute {
			errs = append(errs, fmt.Errorf("--lease-duration %v: want 3s to 5m", c.LeaseDuration))
		}
	case modeDNS:
		if c.DNSName == "" {
			errs = append(errs, errors.New("--bootstrap-mode dns needs --dns-name"))
		}
	default:
		errs = append(errs, fmt.Errorf("--bootstrap-mode %q: want static, k8s-lease or dns", c.BootstrapMode))
	}
	return errors.Join(errs...)
}

// startK8s starts Kubernetes bootstrap and the event recorder.
func startK8s(ctx context.Context, a *app) error {
	c := &a.cfg.K8s
	if err := c.validate(); err != nil {
		return err
	}
	if c.NodeName == "" {
		h, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("no --node-name and no hostname: %w", err)
		}
		c.NodeName = h
	}
	if c.BootstrapMode != modeStatic && a.p2p == nil {
		return fmt.Errorf("--bootstrap-mode %s needs the peer network, which is off", c.BootstrapMode)
	}

	client, err := k8s.NewClient(c.Kubeconfig, "peerd/"+version)
	switch {
	case errors.Is(err, k8s.ErrNoCluster):
		if c.BootstrapMode == modeLease {
			return fmt.Errorf("--bootstrap-mode k8s-lease: %w", err)
		}
		a.log.Info("Kubernetes Events are off", "reason", err.Error())
		client = nil
	case err != nil:
		return err
	default:
		// client-go's own logs (leader election, event retries) join ours.
		klog.SetSlogLogger(a.log.With("component", "client-go"))
	}

	m := k8s.NewMetrics(a.reg)
	kctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	events := k8s.NewEvents(kctx, k8s.EventsOptions{Client: client, NodeName: c.NodeName, Logger: a.log, Metrics: m})
	a.onStop(func(sctx context.Context) error {
		cancel() // a leader releases the Lease here, so another takes over at once
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		defer events.Close()
		select {
		case <-done:
			return nil
		case <-sctx.Done():
			return fmt.Errorf("kubernetes part did not stop in time: %w", sctx.Err())
		}
	})
	a.onFatal = append(a.onFatal, events.Failed)
	a.events = events
	if z := events.Zone(); z != "" && a.p2p != nil && a.cfg.P2P.Zone == "" {
		a.p2p.SetZone(z)
		a.log.Info("zone from the Node's label", "zone", a.p2p.Zone(), "label", k8s.ZoneLabel)
	}

	host := k8sHost{a.p2p}
	if a.p2p != nil && events.Enabled() {
		a.p2p.OnPeerBytes(func(dir p2p.Direction, from peer.ID, n int64) {
			if dir == p2p.Received {
				events.BytesFromPeer(from, n)
			}
		})
		wg.Go(func() { events.WatchPeers(kctx, host.LivePeers, time.Second) })
	}

	var disc k8s.Discoverer
	switch c.BootstrapMode {
	case modeLease:
		watchClient, err := k8s.NewWatchClient(c.Kubeconfig, "peerd/"+version)
		if err != nil {
			return err
		}
		lease, err := k8s.NewLease(host, k8s.LeaseOptions{
			Client:        client,
			WatchClient:   watchClient,
			Namespace:     c.Namespace,
			Name:          c.LeaseName,
			Identity:      c.NodeName,
			LeaseDuration: c.LeaseDuration,
			Logger:        a.log,
			Metrics:       m,
		})
		if err != nil {
			return err
		}
		wg.Go(func() { lease.Run(kctx) })
		disc = lease
	case modeDNS:
		d, err := k8s.NewDNS(host, k8s.DNSOptions{Name: c.DNSName, Logger: a.log})
		if err != nil {
			return err
		}
		disc = d
	default:
		return nil // static: the p2p part dials --bootstrap itself
	}
	boot := k8s.NewBootstrapper(host, disc, k8s.BootstrapOptions{Logger: a.log, Metrics: m})
	wg.Go(func() { boot.Run(kctx) })
	a.readyChecks = append(a.readyChecks, boot.Ready)
	a.log.Info("bootstrap", "mode", c.BootstrapMode, "node", c.NodeName, "namespace", c.Namespace)
	return nil
}

// k8sHost adapts the p2p node to k8s.Host.
type k8sHost struct{ *p2p.Node }

// LivePeers approximates "routing-table peers with a live connection" by the
// smaller of the two counts: every peerd peer is a DHT server, so connected
// peers are routing-table peers, while the routing table keeps dead peers
// until a refresh evicts them.
func (h k8sHost) LivePeers() int {
	return min(h.Node.RoutingTableSize(), h.Node.ConnectedPeers())
}

func init() {
	register("k8s-wait-daemonset", "wait until every pod of a DaemonSet is ready (the Helm chart's uninstall hook)", waitDaemonSetCmd)
}

func waitDaemonSetCmd(args []string) error {
	fs := newFlagSet("k8s-wait-daemonset", `Wait until every pod of a DaemonSet runs its current template and is ready.
The Helm chart's post-delete hook uses it: a cleanup DaemonSet restores
containerd's hosts.toml in an init container on every node, and this waits
until all nodes are done before the hook deletes it.`)
	var (
		kubeconfig, namespace, name string
		timeout                     time.Duration
	)
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig; empty: the pod's service account")
	fs.StringVar(&namespace, "namespace", defaultNamespace(), "the DaemonSet's namespace")
	fs.StringVar(&name, "name", "", "the DaemonSet's name")
	fs.DurationVar(&timeout, "timeout", 3*time.Minute, "give up after this long")
	if err := parse(fs, args); err != nil {
		return err
	}
	if name == "" {
		return errors.New("--name: name the DaemonSet")
	}
	if timeout <= 0 {
		return fmt.Errorf("--timeout %v: want more than 0", timeout)
	}
	client, err := k8s.NewClient(kubeconfig, "peerd/"+version)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return k8s.WaitDaemonSet(ctx, client, namespace, name, 2*time.Second, func(s string) {
		fmt.Printf("%s/%s: %s\n", namespace, name, s)
	})
}
