package itest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multiaddr"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/peerd-project/peerd/k8s"
)

// electionHost is just enough of a node for the election: an identity and
// an address to publish; nobody dials it here.
type electionHost struct {
	id   peer.ID
	addr multiaddr.Multiaddr
}

func newElectionHost(t *testing.T, i int) *electionHost {
	key, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	a := multiaddr.StringCast(fmt.Sprintf("/ip4/10.1.%d.%d/tcp/30001/p2p/%s", i/250, i%250+1, id))
	return &electionHost{id: id, addr: a}
}

func (h *electionHost) ID() peer.ID                                  { return h.id }
func (h *electionHost) Addrs() []multiaddr.Multiaddr                 { return []multiaddr.Multiaddr{h.addr} }
func (h *electionHost) Connect(context.Context, peer.AddrInfo) error { return nil }
func (h *electionHost) LivePeers() int                               { return 0 }

// leaseRequests sums the API server's apiserver_request_total for Leases,
// by verb.
func leaseRequests(ctx context.Context, t *testing.T, api *kubeAPI) map[string]float64 {
	t.Helper()
	raw, err := api.Admin.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(raw))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "apiserver_request_total{") || !strings.Contains(line, `resource="leases"`) {
			continue
		}
		_, verb, _ := strings.Cut(line, `verb="`)
		verb, _, _ = strings.Cut(verb, `"`)
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err == nil {
			out[verb] += v
		}
	}
	return out
}

// TestK8sLeaseRequestRate: N nodes in the election against a real
// kube-apiserver, once with the chart's Role (list and watch allowed: the
// nodes that do not hold the Lease follow it through a watch) and once with
// a Role without them (every node reads the Lease each retry period, as
// before the watch). The API server's own request counters over the same
// window give each rate.
func TestK8sLeaseRequestRate(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	const nodes, window = 60, 10 * time.Second
	api := startKubeAPI(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := api.Admin
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "peerd"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	applyChartRBAC(ctx, t, api)
	// The Role peerd's chart had before the watch: get and update on the
	// Lease, create.
	if _, err := c.RbacV1().Roles("peerd").Create(ctx, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "peerd-poll"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, ResourceNames: []string{"poll-bootstrap"}, Verbs: []string{"get", "update"}},
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"create"}},
	}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RbacV1().RoleBindings("peerd").Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "peerd-poll"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "peerd-poll"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "unbound", Namespace: "peerd"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	rate := func(user, leaseName string) (perSec map[string]float64, leader string) {
		kubeconfig := api.Kubeconfig(t, user)
		ectx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		defer func() { stop(); wg.Wait() }()
		leases := make([]*k8s.Lease, nodes)
		for i := range nodes {
			client, err := k8s.NewClient(kubeconfig, "peerd-itest")
			if err != nil {
				t.Fatal(err)
			}
			wc, err := k8s.NewWatchClient(kubeconfig, "peerd-itest")
			if err != nil {
				t.Fatal(err)
			}
			l, err := k8s.NewLease(newElectionHost(t, i), k8s.LeaseOptions{Client: client, WatchClient: wc, Namespace: "peerd", Name: leaseName,
				Identity: fmt.Sprintf("node-%03d", i), Metrics: k8s.NewMetrics(nil)})
			if err != nil {
				t.Fatal(err)
			}
			leases[i] = l
			wg.Go(func() { l.Run(ectx) })
		}
		until(t, time.Minute, fmt.Sprintf("all %d nodes agree on a leader of %s", nodes, leaseName), func() (bool, string) {
			first := leases[0].Leader()
			for _, l := range leases {
				if l.Leader() == "" || l.Leader() != first {
					return false, fmt.Sprintf("node-000 sees %q, another %q", first, l.Leader())
				}
			}
			return true, ""
		})
		time.Sleep(3 * time.Second) // past the start: every node listed, watched or read once
		before := leaseRequests(ctx, t, api)
		time.Sleep(window)
		after := leaseRequests(ctx, t, api)
		perSec = map[string]float64{}
		for verb, v := range after {
			if d := v - before[verb]; d > 0 {
				perSec[verb] = d / window.Seconds()
			}
		}
		return perSec, leases[0].Leader()
	}
	total := func(m map[string]float64) (s float64) {
		for _, v := range m {
			s += v
		}
		return s
	}
	watching, l1 := rate("system:serviceaccount:peerd:peerd", "peerd-bootstrap")
	polling, l2 := rate("system:serviceaccount:peerd:unbound", "poll-bootstrap")
	t.Logf("%d nodes, lease duration 15 s: API requests for Leases per second: watching %.1f %v (leader %s); every node polling %.1f %v (leader %s); ratio %.3f",
		nodes, total(watching), watching, l1, total(polling), polling, l2, total(watching)/total(polling))
	// Polling: every node reads once per retry period (2 s, jittered up to
	// 2.4x): at least N/5 per second. Watching: the holder's renewal (one
	// update per 2 s) and nothing per follower.
	if total(polling) < nodes/5 {
		t.Errorf("with polling, %d nodes sent %.1f requests/s; want at least %d (the baseline did not poll)", nodes, total(polling), nodes/5)
	}
	if total(watching) > 2 {
		t.Errorf("with the watch, %d nodes sent %.1f requests/s for the Lease; want the holder's renewals only (~0.5/s)", nodes, total(watching))
	}
}
