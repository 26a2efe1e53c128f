package k8s

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	rl "k8s.io/client-go/tools/leaderelection/resourcelock"
)

// LeaderAnnotation holds, on the bootstrap Lease, the leader's libp2p
// addresses as JSON. It names the holder it belongs to, so a reader never
// pairs one node's addresses with another node's holdership.
const LeaderAnnotation = "peerd.io/leader"

type leaderInfo struct {
	Holder string   `json:"holder"`
	PeerID string   `json:"peerID"`
	Addrs  []string `json:"addrs"` // full multiaddrs ending in /p2p/<peerID>
}

// LeaseOptions configure Lease bootstrap.
type LeaseOptions struct {
	Client kubernetes.Interface
	// WatchClient follows the Lease with a long-lived watch (a client
	// without a deadline on the whole request: NewWatchClient); nil: Client.
	WatchClient kubernetes.Interface
	Namespace   string
	Name        string
	// Identity is this node's name in the election (the Kubernetes node name).
	Identity string
	// LeaseDuration is how long a dead leader keeps the Lease (15s); the
	// renew deadline and retry period follow from it as in kube-controller-manager
	// (2/3 and 2/15 of it).
	LeaseDuration time.Duration
	Logger        *slog.Logger
	Metrics       *Metrics
}

// Lease elects one node per Lease as the bootstrap leader. The leader
// publishes its addresses on the Lease; every other node bootstraps from it.
// It is the Discoverer of mode "k8s-lease".
type Lease struct {
	host Host
	opts LeaseOptions
	log  *slog.Logger

	changed chan struct{}
	watch   *leaseWatch

	mu     sync.Mutex
	seen   bool   // a Lease record was read at least once
	holder string // current holder ("" when released or none)
	addrs  []peer.AddrInfo
	why    string // why addrs is empty while a holder exists
	getErr error  // the last failed Lease call, for Discover
}

// NewLease validates opts; Run starts the election.
func NewLease(h Host, opts LeaseOptions) (*Lease, error) {
	var errs []error
	if opts.Client == nil {
		errs = append(errs, errors.New("no Kubernetes client"))
	}
	if opts.Namespace == "" {
		errs = append(errs, errors.New("no namespace for the Lease"))
	}
	if opts.Name == "" {
		errs = append(errs, errors.New("no Lease name"))
	}
	if opts.Identity == "" {
		errs = append(errs, errors.New("no node name to take part in the election"))
	}
	if opts.LeaseDuration == 0 {
		opts.LeaseDuration = 15 * time.Second
	}
	if opts.LeaseDuration < 3*time.Second {
		errs = append(errs, fmt.Errorf("lease duration %s is below 3s", opts.LeaseDuration))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("k8s-lease bootstrap: %w", err)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	wc := opts.WatchClient
	if wc == nil {
		wc = opts.Client
	}
	log := opts.Logger.With("lease", opts.Namespace+"/"+opts.Name)
	return &Lease{
		host:    h,
		opts:    opts,
		log:     log,
		changed: make(chan struct{}, 1),
		watch:   newLeaseWatch(wc.CoordinationV1().Leases(opts.Namespace), opts.Name, log),
	}, nil
}

func (l *Lease) Name() string { return "k8s-lease" }

func (l *Lease) Changed() <-chan struct{} { return l.changed }

// Leader is the identity of the current holder ("" for none).
func (l *Lease) Leader() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.holder
}

// Discover answers the leader's addresses; nobody (alone) when this node leads.
func (l *Lease) Discover(context.Context) ([]peer.AddrInfo, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.getErr != nil:
		return nil, fmt.Errorf("Lease %s/%s: %w", l.opts.Namespace, l.opts.Name, l.getErr)
	case !l.seen:
		return nil, fmt.Errorf("Lease not read yet: %w", ErrPending)
	case l.holder == l.opts.Identity:
		return nil, nil
	case l.holder == "":
		return nil, fmt.Errorf("no leader yet: %w", ErrPending)
	case len(l.addrs) == 0:
		return nil, fmt.Errorf("leader %s: %s", l.holder, l.why)
	}
	return slices.Clone(l.addrs), nil
}

// holding reports whether this node held the Lease when it last read it.
func (l *Lease) holding() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seen && l.holder == l.opts.Identity
}

// Run takes part in the election until ctx ends; a leader that stops releases
// the Lease so another node takes over at once. A node that does not hold
// the Lease reads it from a watch (leaseWatch); the holder's renewals (and
// any read it needs) go to the API server.
func (l *Lease) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	wg.Go(func() { l.watch.run(wctx) })
	d := l.opts.LeaseDuration
	cfg := leaderelection.LeaderElectionConfig{
		Lock:            &leaseLock{l: l},
		LeaseDuration:   d,
		RenewDeadline:   d * 2 / 3,
		RetryPeriod:     d * 2 / 15,
		ReleaseOnCancel: true,
		Name:            "peerd-bootstrap",
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(context.Context) {
				l.log.Info("this node leads bootstrap", "node", l.opts.Identity)
				l.opts.Metrics.setLeader(true)
			},
			OnStoppedLeading: func() {
				l.opts.Metrics.setLeader(false)
			},
		},
	}
	for ctx.Err() == nil {
		le, err := leaderelection.NewLeaderElector(cfg)
		if err != nil {
			// Only a bad config fails here, and NewLease checked it.
			l.log.Error("leader election config", "err", err)
			return
		}
		le.Run(ctx) // returns when leadership is lost, or at ctx's end
		if ctx.Err() == nil {
			l.log.Warn("lost the bootstrap Lease; standing for election again", "node", l.opts.Identity)
			select {
			case <-ctx.Done():
			case <-time.After(cfg.RetryPeriod):
			}
		}
	}
}

// observe learns holder and leader addresses from every Lease the election
// reads or writes: the election reads the Lease each retry period anyway
// (from the watch, or the API server), so following the leader costs no
// extra API call.
func (l *Lease) observe(lease *coordinationv1.Lease) {
	holder := ""
	if lease.Spec.HolderIdentity != nil {
		holder = *lease.Spec.HolderIdentity
	}
	addrs, why := parseLeader(holder, lease.Annotations[LeaderAnnotation])
	l.mu.Lock()
	changed := !l.seen || holder != l.holder || !sameAddrs(addrs, l.addrs)
	l.seen, l.holder, l.addrs, l.why, l.getErr = true, holder, addrs, why, nil
	l.mu.Unlock()
	if changed {
		if holder != "" && holder != l.opts.Identity {
			l.log.Info("bootstrap leader", "leader", holder, "peers", fmt.Sprint(addrs), "problem", why)
		}
		select {
		case l.changed <- struct{}{}:
		default:
		}
	}
}

// apiFailed remembers a failed Lease call for Discover (and so /readyz),
// until the next successful one.
func (l *Lease) apiFailed(err error) {
	l.mu.Lock()
	first := l.getErr == nil
	l.getErr = err
	l.mu.Unlock()
	if first {
		l.log.Warn("bootstrap Lease call failed", "err", err)
		select {
		case l.changed <- struct{}{}:
		default:
		}
	}
}

func parseLeader(holder, raw string) ([]peer.AddrInfo, string) {
	if holder == "" {
		return nil, "no holder"
	}
	if raw == "" {
		return nil, "has not published its addresses"
	}
	var info leaderInfo
	if err := json.Unmarshal([]byte(raw), &info); err != nil {
		return nil, fmt.Sprintf("bad %s annotation: %v", LeaderAnnotation, err)
	}
	if info.Holder != holder {
		return nil, fmt.Sprintf("addresses on the Lease belong to %q, not the holder", info.Holder)
	}
	var mas []multiaddr.Multiaddr
	for _, s := range info.Addrs {
		ma, err := multiaddr.NewMultiaddr(s)
		if err != nil {
			continue // one bad address must not hide the good ones
		}
		mas = append(mas, ma)
	}
	ais, err := peer.AddrInfosFromP2pAddrs(mas...)
	// Only the leader's own addresses: one Lease names one peer.
	ais = slices.DeleteFunc(ais, func(ai peer.AddrInfo) bool { return ai.ID.String() != info.PeerID })
	if err != nil || len(ais) == 0 {
		return nil, fmt.Sprintf("no usable address of peer %q in %q", info.PeerID, info.Addrs)
	}
	return ais, ""
}

func sameAddrs(a, b []peer.AddrInfo) bool {
	return fmt.Sprint(a) == fmt.Sprint(b)
}

// leaseLock is resourcelock.LeaseLock plus the leader's addresses: they are
// written in the same Update that names the holder, so readers always see a
// matching pair, and a released Lease carries no stale addresses.
type leaseLock struct {
	l     *Lease
	lease *coordinationv1.Lease // last read or written
}

var _ rl.Interface = (*leaseLock)(nil)

func (k *leaseLock) client() interface {
	Get(context.Context, string, metav1.GetOptions) (*coordinationv1.Lease, error)
	Create(context.Context, *coordinationv1.Lease, metav1.CreateOptions) (*coordinationv1.Lease, error)
	Update(context.Context, *coordinationv1.Lease, metav1.UpdateOptions) (*coordinationv1.Lease, error)
} {
	return k.l.opts.Client.CoordinationV1().Leases(k.l.opts.Namespace)
}

func (k *leaseLock) Get(ctx context.Context) (*rl.LeaderElectionRecord, []byte, error) {
	if !k.l.holding() {
		if lease, ok := k.l.watch.current(); ok {
			k.l.opts.Metrics.leaseRead("watch")
			if lease == nil {
				return nil, nil, apierrors.NewNotFound(coordinationv1.Resource("leases"), k.l.opts.Name)
			}
			return k.read(lease)
		}
	}
	k.l.opts.Metrics.leaseRead("api")
	lease, err := k.client().Get(ctx, k.l.opts.Name, metav1.GetOptions{})
	if err != nil {
		if !apierrors.IsNotFound(err) { // not found: the election creates it
			k.l.apiFailed(err)
		}
		return nil, nil, err
	}
	return k.read(lease)
}

// read takes lease as the current record.
func (k *leaseLock) read(lease *coordinationv1.Lease) (*rl.LeaderElectionRecord, []byte, error) {
	k.lease = lease
	k.l.observe(lease)
	rec := rl.LeaseSpecToLeaderElectionRecord(&lease.Spec)
	raw, err := json.Marshal(rec)
	if err != nil {
		return nil, nil, err
	}
	return rec, raw, nil
}

func (k *leaseLock) Create(ctx context.Context, ler rl.LeaderElectionRecord) error {
	lease := &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{
			Name:      k.l.opts.Name,
			Namespace: k.l.opts.Namespace,
			Labels:    map[string]string{"app.kubernetes.io/name": "peerd"},
		},
		Spec: rl.LeaderElectionRecordToLeaseSpec(&ler),
	}
	k.annotate(lease, ler.HolderIdentity)
	created, err := k.client().Create(ctx, lease, metav1.CreateOptions{})
	if err != nil {
		if !apierrors.IsAlreadyExists(err) { // lost a race to create: normal
			k.l.apiFailed(fmt.Errorf("create: %w", err))
		} else {
			k.l.watch.stale()
		}
		return err
	}
	k.lease = created
	k.l.observe(created)
	return nil
}

func (k *leaseLock) Update(ctx context.Context, ler rl.LeaderElectionRecord) error {
	if k.lease == nil {
		return errors.New("lease not read yet")
	}
	lease := k.lease.DeepCopy()
	lease.Spec = rl.LeaderElectionRecordToLeaseSpec(&ler)
	k.annotate(lease, ler.HolderIdentity)
	updated, err := k.client().Update(ctx, lease, metav1.UpdateOptions{})
	if err != nil {
		if !apierrors.IsConflict(err) { // lost a race to update: normal
			k.l.apiFailed(fmt.Errorf("update: %w", err))
		} else {
			k.l.watch.stale()
		}
		return err
	}
	k.lease = updated
	k.l.observe(updated)
	return nil
}

// annotate publishes this node's addresses when it is the holder being
// written, and removes any when it is not (a release).
func (k *leaseLock) annotate(lease *coordinationv1.Lease, holder string) {
	if holder != k.l.opts.Identity {
		delete(lease.Annotations, LeaderAnnotation)
		return
	}
	info := leaderInfo{Holder: holder, PeerID: k.l.host.ID().String()}
	for _, a := range publishable(k.l.host.Addrs()) {
		info.Addrs = append(info.Addrs, a.String())
	}
	raw, _ := json.Marshal(info) // strings only: cannot fail
	if lease.Annotations == nil {
		lease.Annotations = map[string]string{}
	}
	lease.Annotations[LeaderAnnotation] = string(raw)
}

// publishable drops loopback addresses when the node has others: on another
// node, 127.0.0.1 is that node itself.
func publishable(addrs []multiaddr.Multiaddr) []multiaddr.Multiaddr {
	var out []multiaddr.Multiaddr
	for _, a := range addrs {
		if !manet.IsIPLoopback(a) {
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		return addrs // a single-machine setup (tests): loopback is all there is
	}
	return out
}

func (k *leaseLock) RecordEvent(string) {}
func (k *leaseLock) Identity() string   { return k.l.opts.Identity }
func (k *leaseLock) Describe() string   { return k.l.opts.Namespace + "/" + k.l.opts.Name }
