package k8s

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"
)

// Event reasons, on the node's Node object.
const (
	// ReasonConnected: the routing table gained its first live peer.
	ReasonConnected = "P2PConnected"
	// ReasonDisconnected: no live peer is left in the routing table.
	ReasonDisconnected = "P2PDisconnected"
	// ReasonActive: blob bytes arrived from a peer (at most once per ActiveEvery).
	ReasonActive = "P2PActive"
	// ReasonFailed: the daemon stopped on a fatal error.
	ReasonFailed = "P2PFailed"
)

// EventsOptions configure Events.
type EventsOptions struct {
	// Client is the API client; nil turns Events off.
	Client kubernetes.Interface
	// NodeName is the Node the Events are about.
	NodeName string
	// ActiveEvery rate-limits P2PActive (10m).
	ActiveEvery time.Duration
	Logger      *slog.Logger
	Metrics     *Metrics
}

// Events reports the node's peer-network state as Kubernetes Events. A
// disabled Events (no client) accepts every call and does nothing.
type Events struct {
	opts EventsOptions
	log  *slog.Logger

	broadcaster record.EventBroadcaster
	rec         record.EventRecorder
	ref         *corev1.ObjectReference
	zone        string // the Node's zone label, read with its UID

	// P2PActive sits on the data path: lock-free.
	lastActive   atomic.Int64 // unix nanos of the last P2PActive
	pendingBytes atomic.Int64 // bytes received since then

	mu        sync.Mutex
	connected bool
}

// NewEvents starts the event recorder. It reads the Node once (bounded by
// ctx) for its UID, so Events attach to this incarnation of the Node.
func NewEvents(ctx context.Context, opts EventsOptions) *Events {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.ActiveEvery <= 0 {
		opts.ActiveEvery = 10 * time.Minute
	}
	e := &Events{opts: opts, log: opts.Logger.With("node", opts.NodeName)}
	if opts.Client == nil || opts.NodeName == "" {
		return e
	}
	e.ref = &corev1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: opts.NodeName, UID: types.UID(opts.NodeName)}
	// Bounded tightly: this runs before the HTTP face serves its probes.
	gctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	node, err := opts.Client.CoreV1().Nodes().Get(gctx, opts.NodeName, metav1.GetOptions{})
	cancel()
	if err != nil {
		// Still report: kubectl finds the Events by the Node's name. The
		// kubelet itself uses the name as the UID of its Node events.
		e.log.Warn("cannot read the Node object; Events refer to it by name", "err", err)
	} else {
		e.ref.UID = node.UID
		e.zone = node.Labels[ZoneLabel]
	}
	e.broadcaster = record.NewBroadcaster(record.WithContext(ctx))
	e.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: opts.Client.CoreV1().Events("")})
	e.rec = e.broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "peerd", Host: opts.NodeName})
	return e
}

// ZoneLabel is the Node label that names its zone.
const ZoneLabel = "topology.kubernetes.io/zone"

// Zone is the Node's zone label as read at start ("" when none or unread).
func (e *Events) Zone() string { return e.zone }

// Enabled reports whether Events go anywhere.
func (e *Events) Enabled() bool { return e.rec != nil }

// Close stops the recorder; Events not yet written are dropped.
func (e *Events) Close() {
	if e.broadcaster != nil {
		e.broadcaster.Shutdown()
	}
}

func (e *Events) emit(typ, reason, format string, args ...any) {
	if e.rec == nil {
		return
	}
	e.opts.Metrics.event(reason)
	e.log.Info("event", "reason", reason, "message", fmt.Sprintf(format, args...))
	e.rec.Eventf(e.ref, typ, reason, format, args...)
}

// Peers reports the number of live routing-table peers (Host.LivePeers):
// P2PConnected when it leaves zero, P2PDisconnected when it returns there.
func (e *Events) Peers(size int) {
	e.mu.Lock()
	was := e.connected
	e.connected = size > 0
	e.mu.Unlock()
	switch {
	case !was && size > 0:
		e.emit(corev1.EventTypeNormal, ReasonConnected, "joined the peer network: %d live peer(s) in the routing table", size)
	case was && size == 0:
		e.emit(corev1.EventTypeWarning, ReasonDisconnected, "lost every peer: no live peer in the routing table; bootstrapping again")
	}
}

// WatchPeers polls size until ctx ends and reports each change.
func (e *Events) WatchPeers(ctx context.Context, size func() int, every time.Duration) {
	if e.rec == nil {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		e.Peers(size())
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// BytesFromPeer counts blob bytes received from a peer and emits P2PActive
// at most once per ActiveEvery. It never blocks: it is on the data path.
func (e *Events) BytesFromPeer(from peer.ID, n int64) {
	if e.rec == nil || n <= 0 {
		return
	}
	total := e.pendingBytes.Add(n)
	now := time.Now().UnixNano()
	last := e.lastActive.Load()
	if last != 0 && now-last < int64(e.opts.ActiveEvery) {
		return
	}
	if !e.lastActive.CompareAndSwap(last, now) {
		return // another reader just emitted
	}
	e.pendingBytes.Add(-total)
	window := "since peerd started"
	if last != 0 {
		window = "in the last " + time.Duration(now-last).Round(time.Second).String()
	}
	e.emit(corev1.EventTypeNormal, ReasonActive, "received %d bytes of blobs from peers %s (latest from %s)", total, window, from)
}

// Failed writes P2PFailed at once, bypassing the recorder's queue: the
// process is about to exit and would drop a queued event.
func (e *Events) Failed(ctx context.Context, cause error) {
	if e.rec == nil {
		return
	}
	e.opts.Metrics.event(ReasonFailed)
	now := metav1.Now()
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{
			Name:      fmt.Sprintf("%s.%x", e.ref.Name, now.UnixNano()),
			Namespace: metav1.NamespaceDefault,
		},
		InvolvedObject:      *e.ref,
		Reason:              ReasonFailed,
		Message:             truncate(fmt.Sprintf("peerd stopped: %v", cause), 1024),
		Type:                corev1.EventTypeWarning,
		Source:              corev1.EventSource{Component: "peerd", Host: e.opts.NodeName},
		FirstTimestamp:      now,
		LastTimestamp:       now,
		Count:               1,
		ReportingController: "peerd",
		ReportingInstance:   e.opts.NodeName,
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := e.opts.Client.CoreV1().Events(ev.Namespace).Create(cctx, ev, metav1.CreateOptions{}); err != nil {
		e.log.Warn("cannot write the P2PFailed event", "err", err, "cause", cause)
		return
	}
	e.log.Info("event", "reason", ReasonFailed, "message", ev.Message)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
