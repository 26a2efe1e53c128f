package k8s

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multiaddr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// addrHost is a fakeHost with a real peer ID and address.
type addrHost struct {
	*fakeHost
	addr multiaddr.Multiaddr
}

func newAddrHost(t *testing.T, ip string) *addrHost {
	id, err := randomPeerID()
	if err != nil {
		t.Fatal(err)
	}
	a := multiaddr.StringCast("/ip4/" + ip + "/tcp/4001/p2p/" + id.String())
	h := &addrHost{fakeHost: newFakeHost(string(id)), addr: a}
	return h
}

func (h *addrHost) Addrs() []multiaddr.Multiaddr { return []multiaddr.Multiaddr{h.addr} }

func runLease(t *testing.T, c kubernetes.Interface, h Host, node string) (*Lease, context.CancelFunc) {
	t.Helper()
	return runLeaseWith(t, h, LeaseOptions{Client: c, Identity: node})
}

// runLeaseWith runs a Lease of opts (namespace peerd, name peerd-bootstrap
// and a 3 s duration unless set) until the test ends or stop is called.
func runLeaseWith(t *testing.T, h Host, opts LeaseOptions) (*Lease, context.CancelFunc) {
	t.Helper()
	if opts.Namespace == "" {
		opts.Namespace = "peerd"
	}
	if opts.Name == "" {
		opts.Name = "peerd-bootstrap"
	}
	if opts.LeaseDuration == 0 {
		opts.LeaseDuration = 3 * time.Second
	}
	l, err := NewLease(h, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); l.Run(ctx) }()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	return l, stop
}

func TestLeaseLeaderPublishesAndHandsOver(t *testing.T) {
	c := fake.NewClientset()
	ha, hb := newAddrHost(t, "127.0.0.1"), newAddrHost(t, "127.0.0.2")
	a, stopA := runLease(t, c, ha, "node-a")
	eventually(t, "node-a leads", func() bool { return a.Leader() == "node-a" })
	if ps, err := a.Discover(context.Background()); err != nil || len(ps) != 0 {
		t.Fatalf("leader's Discover = %v, %v; want alone", ps, err)
	}

	b, _ := runLease(t, c, hb, "node-b")
	eventually(t, "node-b sees node-a lead", func() bool { return b.Leader() == "node-a" })
	ps, err := b.Discover(context.Background())
	if err != nil || len(ps) != 1 || ps[0].ID != ha.ID() || !ps[0].Addrs[0].Equal(multiaddr.StringCast("/ip4/127.0.0.1/tcp/4001")) {
		t.Fatalf("follower's Discover = %v, %v; want node-a's address", ps, err)
	}

	// The leader stops: it releases the Lease, and node-b takes over.
	stopA()
	eventually(t, "node-b leads", func() bool { return b.Leader() == "node-b" })
	lease, err := c.CoordinationV1().Leases("peerd").Get(context.Background(), "peerd-bootstrap", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var info leaderInfo
	if err := json.Unmarshal([]byte(lease.Annotations[LeaderAnnotation]), &info); err != nil {
		t.Fatalf("annotation %q: %v", lease.Annotations[LeaderAnnotation], err)
	}
	if info.Holder != "node-b" || info.PeerID != hb.ID().String() || len(info.Addrs) != 1 || info.Addrs[0] != hb.addr.String() {
		t.Fatalf("annotation after takeover = %+v, want node-b's address", info)
	}
}

func TestParseLeader(t *testing.T) {
	id, _ := randomPeerID()
	other, _ := randomPeerID()
	good := `{"holder":"n1","peerID":"` + id.String() + `","addrs":["/ip4/10.0.0.1/tcp/4001/p2p/` + id.String() + `","not-a-multiaddr","/ip4/10.0.0.2/tcp/4001/p2p/` + other.String() + `"]}`
	for _, tc := range []struct {
		name, holder, raw string
		want              int
	}{
		{"good; a bad address and another peer's skipped", "n1", good, 1},
		{"holder mismatch", "n2", good, 0},
		{"no holder", "", good, 0},
		{"no annotation", "n1", "", 0},
		{"not json", "n1", "{", 0},
		{"no /p2p part", "n1", `{"holder":"n1","peerID":"` + id.String() + `","addrs":["/ip4/10.0.0.1/tcp/4001"]}`, 0},
		{"no peer ID", "n1", `{"holder":"n1","addrs":["/ip4/10.0.0.1/tcp/4001/p2p/` + id.String() + `"]}`, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ais, why := parseLeader(tc.holder, tc.raw)
			if len(ais) != tc.want {
				t.Fatalf("got %v (%s), want %d peers", ais, why, tc.want)
			}
			if tc.want == 0 && why == "" {
				t.Fatal("no reason given for an unusable record")
			}
			if tc.want == 1 && ais[0].ID != peer.ID(id) {
				t.Fatalf("peer %s, want %s", ais[0].ID, id)
			}
		})
	}
}

func TestNewLeaseRejectsBadOptions(t *testing.T) {
	h := newFakeHost("x")
	if _, err := NewLease(h, LeaseOptions{}); err == nil {
		t.Fatal("empty options accepted")
	}
	if _, err := NewLease(h, LeaseOptions{Client: fake.NewClientset(), Namespace: "n", Name: "l", Identity: "i", LeaseDuration: time.Second}); err == nil {
		t.Fatal("1s lease duration accepted")
	}
}

func TestLeaseReadErrorIsReported(t *testing.T) {
	c := fake.NewClientset()
	forbidden := apierrors.NewForbidden(schema.GroupResource{Group: "coordination.k8s.io", Resource: "leases"}, "peerd-bootstrap", errors.New("RBAC: no get"))
	// No way to read the Lease at all (a missing Role): neither a GET nor
	// the watch's list and watch.
	for _, verb := range []string{"get", "list"} {
		c.PrependReactor(verb, "leases", func(k8stesting.Action) (bool, runtime.Object, error) { return true, nil, forbidden })
	}
	c.PrependWatchReactor("leases", func(k8stesting.Action) (bool, watch.Interface, error) { return true, nil, forbidden })
	l, _ := runLease(t, c, newAddrHost(t, "127.0.0.1"), "node-a")
	eventually(t, "the read error to surface", func() bool {
		_, err := l.Discover(context.Background())
		return err != nil && strings.Contains(err.Error(), "forbidden") && !errors.Is(err, ErrPending)
	})
	select {
	case <-l.Changed():
	default:
		t.Fatal("no change signalled for the first read error")
	}
}

func TestPublishableDropsLoopbackOnlyWhenOthersExist(t *testing.T) {
	lo := multiaddr.StringCast("/ip4/127.0.0.1/tcp/1/p2p/12D3KooWKnDdG3iXw9eTFijk3EWSunZcFi54Zka4wmtqtt6rPxc8")
	lo6 := multiaddr.StringCast("/ip6/::1/tcp/1/p2p/12D3KooWKnDdG3iXw9eTFijk3EWSunZcFi54Zka4wmtqtt6rPxc8")
	lan := multiaddr.StringCast("/ip4/10.1.2.3/tcp/1/p2p/12D3KooWKnDdG3iXw9eTFijk3EWSunZcFi54Zka4wmtqtt6rPxc8")
	if got := publishable([]multiaddr.Multiaddr{lo, lan, lo6}); len(got) != 1 || !got[0].Equal(lan) {
		t.Errorf("publishable(lo, lan, lo6) = %v, want [lan]", got)
	}
	if got := publishable([]multiaddr.Multiaddr{lo}); len(got) != 1 || !got[0].Equal(lo) {
		t.Errorf("publishable(lo) = %v, want [lo]", got)
	}
}

func TestLeaseCreateErrorIsReported(t *testing.T) {
	c := fake.NewClientset() // no Lease yet: the election creates it
	c.PrependReactor("create", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "coordination.k8s.io", Resource: "leases"}, "peerd-bootstrap", errors.New("RBAC: no create"))
	})
	l, _ := runLease(t, c, newAddrHost(t, "127.0.0.1"), "node-a")
	eventually(t, "the create error to surface", func() bool {
		_, err := l.Discover(context.Background())
		return err != nil && strings.Contains(err.Error(), "create") && strings.Contains(err.Error(), "forbidden")
	})
}
