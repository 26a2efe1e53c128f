package k8s

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// apiServer stands for the API server behind several nodes' clients: one
// object store, and the optimistic concurrency the fake alone lacks (an
// update must carry the stored resourceVersion, or it conflicts), without
// which two nodes could both take a released Lease.
type apiServer struct {
	*fake.Clientset
	mu sync.Mutex
	rv int
}

func newAPIServer() *apiServer { return &apiServer{Clientset: fake.NewClientset()} }

// write stores a Lease created or updated through any node's client.
func (s *apiServer) write(a k8stesting.Action) (bool, runtime.Object, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o := s.Tracker()
	lease := a.(k8stesting.CreateAction).GetObject().(*coordinationv1.Lease).DeepCopy()
	gr := a.GetResource().GroupResource()
	cur, err := o.Get(a.GetResource(), a.GetNamespace(), lease.Name)
	switch {
	case a.GetVerb() == "create" && err == nil:
		return true, nil, apierrors.NewAlreadyExists(gr, lease.Name)
	case a.GetVerb() == "update" && err != nil:
		return true, nil, err
	case a.GetVerb() == "update" && cur.(*coordinationv1.Lease).ResourceVersion != lease.ResourceVersion:
		return true, nil, apierrors.NewConflict(gr, lease.Name, errors.New("the object has been modified"))
	}
	s.rv++
	lease.ResourceVersion = strconv.Itoa(s.rv)
	if a.GetVerb() == "create" {
		err = o.Create(a.GetResource(), lease, a.GetNamespace())
	} else {
		err = o.Update(a.GetResource(), lease, a.GetNamespace())
	}
	return true, lease, err
}

// nodeClient is one node's client of the API server: every node sees the
// same objects, and each client records only its own node's requests.
func nodeClient(shared *apiServer) *fake.Clientset {
	cs := &fake.Clientset{}
	o := shared.Tracker()
	cs.AddReactor("create", "leases", shared.write)
	cs.AddReactor("update", "leases", shared.write)
	cs.AddReactor("*", "*", k8stesting.ObjectReaction(o))
	cs.AddWatchReactor("*", func(a k8stesting.Action) (bool, watch.Interface, error) {
		w, err := o.Watch(a.GetResource(), a.GetNamespace())
		return err == nil, w, err
	})
	return cs
}

// leaseCalls counts the node's requests with that verb for Leases.
func leaseCalls(c *fake.Clientset, verb string) int {
	n := 0
	for _, a := range c.Actions() {
		if a.GetVerb() == verb && a.GetResource().Resource == "leases" {
			n++
		}
	}
	return n
}

func leaseGets(c *fake.Clientset) int { return leaseCalls(c, "get") }

type leaseNode struct {
	lease  *Lease
	client *fake.Clientset
	m      *Metrics
	stop   context.CancelFunc
}

func startLeaseNode(t *testing.T, shared *apiServer, i int) *leaseNode {
	t.Helper()
	c := nodeClient(shared)
	m := NewMetrics(prometheus.NewRegistry())
	l, stop := runLeaseWith(t, newAddrHost(t, fmt.Sprintf("127.0.0.%d", i+1)), LeaseOptions{Client: c, Identity: fmt.Sprintf("node-%d", i), Metrics: m})
	return &leaseNode{lease: l, client: c, m: m, stop: stop}
}

// The nodes that do not hold the Lease read it from their watch, not from
// the API server: at thousands of nodes, polling it every retry period would
// be the API server's largest load from peerd. The holder renews it (an
// update every retry period), and a handover works through the watch.
func TestLeaseFollowersReadTheWatchNotTheAPI(t *testing.T) {
	shared := newAPIServer()
	nodes := []*leaseNode{startLeaseNode(t, shared, 0)}
	eventually(t, "node-0 leads", func() bool { return nodes[0].lease.Leader() == "node-0" })
	for i := 1; i < 4; i++ {
		nodes = append(nodes, startLeaseNode(t, shared, i))
	}
	for _, n := range nodes[1:] {
		eventually(t, n.lease.opts.Identity+" follows node-0 from its watch", func() bool {
			return n.lease.Leader() == "node-0" && testutil.ToFloat64(n.m.reads.WithLabelValues("watch")) > 0
		})
	}
	calls := func(n *leaseNode) int { return len(n.client.Actions()) }
	before := make([]int, len(nodes))
	renewals := leaseCalls(nodes[0].client, "update")
	for i, n := range nodes {
		before[i] = calls(n)
	}
	time.Sleep(2 * time.Second) // 5 retry periods (400 ms)
	for i, n := range nodes {
		got := calls(n) - before[i]
		switch {
		case i == 0 && leaseCalls(n.client, "update")-renewals < 2:
			t.Errorf("the holder renewed the Lease %d times in 2 s; want every retry period (400 ms)", leaseCalls(n.client, "update")-renewals)
		case i > 0 && got != 0:
			t.Errorf("%s, not the holder, sent %d requests to the API server in 2 s; want 0 (its watch answers): %v", n.lease.opts.Identity, got, n.client.Actions()[before[i]:])
		}
	}

	// The holder stops and releases the Lease; a follower sees that on its
	// watch, takes over and publishes its addresses.
	nodes[0].stop()
	var leader string
	eventually(t, "a follower leads", func() bool {
		leader = nodes[1].lease.Leader()
		return leader != "" && leader != "node-0"
	})
	for _, n := range nodes[1:] {
		eventually(t, n.lease.opts.Identity+" agrees on the new leader", func() bool { return n.lease.Leader() == leader })
		if n.lease.opts.Identity == leader {
			continue
		}
		ps, err := n.lease.Discover(context.Background())
		if err != nil || len(ps) != 1 {
			t.Errorf("%s: Discover after the handover = %v, %v; want the new leader", n.lease.opts.Identity, ps, err)
		}
	}
}

// A node whose watch cannot be opened (an API server or RBAC that refuses
// it) reads the Lease from the API every retry period, as before.
func TestLeaseWithoutWatchPollsTheAPI(t *testing.T) {
	shared := newAPIServer()
	a := startLeaseNode(t, shared, 0)
	eventually(t, "node-0 leads", func() bool { return a.lease.Leader() == "node-0" })
	c := nodeClient(shared)
	c.PrependWatchReactor("leases", func(k8stesting.Action) (bool, watch.Interface, error) {
		return true, nil, errors.New("leases.coordination.k8s.io is forbidden: cannot watch")
	})
	m := NewMetrics(prometheus.NewRegistry())
	l, _ := runLeaseWith(t, newAddrHost(t, "127.0.0.9"), LeaseOptions{Client: c, Identity: "node-9", Metrics: m})
	eventually(t, "node-9 follows node-0", func() bool { return l.Leader() == "node-0" })
	before := leaseGets(c)
	time.Sleep(2 * time.Second)
	if got := leaseGets(c) - before; got < 2 {
		t.Errorf("without a watch, node-9 read the Lease %d times from the API in 2 s; want every retry period", got)
	}
	if w := testutil.ToFloat64(m.reads.WithLabelValues("watch")); w != 0 {
		t.Errorf("%v reads answered by a watch that never opened", w)
	}
}
