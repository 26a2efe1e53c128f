package itest

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// TestK8sLeaseBootstrapAndEvents runs three peerd processes with
// --bootstrap-mode k8s-lease against a real API server, each as the chart's
// ServiceAccount bound by the chart's own RBAC objects.
func TestK8sLeaseBootstrapAndEvents(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd, kube-apiserver and three peerd processes")
	}
	api := startKubeAPI(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := api.Admin

	// The cluster: a namespace, three Nodes, and the chart's RBAC.
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "peerd"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	nodeUID := map[string]types.UID{}
	for _, name := range []string{"node-a", "node-b", "node-c"} {
		n, err := c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		nodeUID[name] = n.UID
	}
	applyChartRBAC(ctx, t, api)
	kubeconfig := api.Kubeconfig(t, "system:serviceaccount:peerd:peerd")

	origin := NewOrigin(t, "")
	const size = 3<<20 + 7
	data, dg := RandomBlob(t, size)
	url := origin.Put(storagePath(dg), data)
	start := func(node string) *p2pNode {
		return startP2PNode(t, "--upstream-allow="+origin.Host,
			"--bootstrap-mode=k8s-lease", "--kubeconfig="+kubeconfig,
			"--node-name="+node, "--namespace=peerd", "--lease-duration=4s")
	}

	// One node alone: it leads, and is ready by itself.
	a := start("node-a")
	until(t, 30*time.Second, "node-a to hold the Lease", func() (bool, string) {
		h := leaseHolder(ctx, c)
		return h == "node-a", h
	})
	waitReady(t, a.Node)
	if got := a.Metric(t, "peerd_k8s_lease_leader"); got != 1 {
		t.Fatalf("node-a peerd_k8s_lease_leader = %v, want 1", got)
	}
	id, addrs := leaseAddrs(ctx, t, c)
	if id != a.ID || len(addrs) != 1 || addrs[0] != a.P2PAddr {
		t.Fatalf("Lease publishes peer %s at %v, want node-a's %s", id, addrs, a.P2PAddr)
	}

	// Two more: they bootstrap through the leader.
	b, cc := start("node-b"), start("node-c")
	for _, n := range []*p2pNode{b, cc} {
		waitReady(t, n.Node)
		until(t, 30*time.Second, n.Name+" to connect to the leader", func() (bool, string) {
			return logHasLine(n.Node, "connected to bootstrap peer", "peer="+a.ID), "no connection logged"
		})
	}
	waitMetric(t, a.Node, "peerd_p2p_routing_table_peers", 2)
	// The followers read the Lease from their watch (the chart's Role allows
	// list and watch on its name, asked with a metadata.name field
	// selector): no GET every retry period (533 ms here).
	for _, n := range []*p2pNode{b, cc} {
		waitMetric(t, n.Node, "peerd_k8s_lease_reads_total", 3, "from=watch")
	}
	apiReads := func() float64 {
		return b.Metric(t, "peerd_k8s_lease_reads_total", "from=api") + cc.Metric(t, "peerd_k8s_lease_reads_total", "from=api")
	}
	before, watched := apiReads(), b.Metric(t, "peerd_k8s_lease_reads_total", "from=watch")
	time.Sleep(2 * time.Second)
	if got := apiReads() - before; got != 0 {
		t.Errorf("the two followers read the Lease %v times from the API server in 2 s; want 0 (their watches answer)", got)
	}
	if got := b.Metric(t, "peerd_k8s_lease_reads_total", "from=watch") - watched; got < 2 {
		t.Errorf("node-b's election read the watched Lease %v times in 2 s; want one every retry period", got)
	}
	if h := leaseHolder(ctx, c); h != "node-a" {
		t.Fatalf("the Lease moved to %q while node-a was alive", h)
	}
	if got := a.Metric(t, "peerd_bootstrap_rounds_total", "result=connected"); got != 0 {
		t.Errorf("the leader dialed %v bootstrap rounds, want none (it is the one others dial)", got)
	}

	// Every node's routing table became non-empty: P2PConnected on each
	// Node, attached to that Node's UID. Nobody received blob bytes yet.
	for node := range nodeUID {
		ev := waitEvent(ctx, t, c, node, "P2PConnected")
		if ev.InvolvedObject.Kind != "Node" || ev.InvolvedObject.UID != nodeUID[node] {
			t.Errorf("%s P2PConnected is about %s %s uid %s, want Node uid %s", node, ev.InvolvedObject.Kind, ev.InvolvedObject.Name, ev.InvolvedObject.UID, nodeUID[node])
		}
		if ev.Type != corev1.EventTypeNormal || ev.Source.Component != "peerd" {
			t.Errorf("%s P2PConnected: type %s source %+v", node, ev.Type, ev.Source)
		}
		if evs := events(ctx, t, c, node, "P2PActive"); len(evs) != 0 {
			t.Errorf("%s has P2PActive before any peer sent it bytes: %v", node, evs[0].Message)
		}
	}

	// node-a takes the blob from the origin, node-b from node-a: only node-b
	// received bytes from a peer, so only node-b reports P2PActive.
	if code, _, body := Get(t, "GET", a.URL("/blobs/"+url), nil); code != 200 || Digest(body) != dg {
		t.Fatalf("node-a: status %d, digest %s", code, Digest(body))
	}
	waitMetric(t, a.Node, "peerd_p2p_provides_total", 1, "result=ok")
	if code, _, body := Get(t, "GET", b.URL("/blobs/"+url), nil); code != 200 || Digest(body) != dg {
		t.Fatalf("node-b: status %d, digest %s", code, Digest(body))
	}
	if got := b.Metric(t, "peerd_p2p_received_bytes_total"); got < size {
		t.Fatalf("node-b received %v bytes from peers, want the blob's %d", got, size)
	}
	ev := waitEvent(ctx, t, c, "node-b", "P2PActive")
	if !strings.Contains(ev.Message, "bytes") || ev.InvolvedObject.UID != nodeUID["node-b"] {
		t.Errorf("node-b P2PActive: %q about uid %s", ev.Message, ev.InvolvedObject.UID)
	}
	// The same blob again is served from node-b's cache: no peer bytes.
	for _, node := range []string{"node-a", "node-c"} {
		if evs := events(ctx, t, c, node, "P2PActive"); len(evs) != 0 {
			t.Errorf("%s reports P2PActive without receiving peer bytes: %q", node, evs[0].Message)
		}
	}

	// The leader dies without releasing the Lease: once it expires, a
	// survivor takes over, and the other one bootstraps from it.
	a.Kill()
	killed := time.Now()
	var leader string
	until(t, 60*time.Second, "a new leader", func() (bool, string) {
		leader = leaseHolder(ctx, c)
		return leader == "node-b" || leader == "node-c", leader
	})
	t.Logf("new leader %s, %v after the old one was killed (lease duration 4s)", leader, time.Since(killed).Round(100*time.Millisecond))
	newLeader, follower := b, cc
	if leader == "node-c" {
		newLeader, follower = cc, b
	}
	waitMetric(t, newLeader.Node, "peerd_k8s_lease_leader", 1)
	until(t, 30*time.Second, "the Lease to publish the new leader's address", func() (bool, string) {
		id, got := leaseAddrs(ctx, t, c)
		return id == newLeader.ID && len(got) == 1 && got[0] == newLeader.P2PAddr, fmt.Sprint(id, got)
	})
	until(t, 30*time.Second, "the follower to bootstrap from the new leader", func() (bool, string) {
		return logHasLine(follower.Node, "connected to bootstrap peer", "peer="+newLeader.ID), "not yet"
	})
	waitMetric(t, follower.Node, "peerd_p2p_routing_table_peers", 1)

	// The last peer stops gracefully: as the leader, it releases the Lease
	// on its way out (a killed leader above kept it until it expired). The
	// follower's last live peer is gone: it says so (P2PDisconnected), and
	// it leads alone.
	newLeaderNode := leader
	if err := newLeader.Stop(); err != nil {
		t.Fatalf("%s did not stop cleanly: %v", newLeaderNode, err)
	}
	if h := leaseHolder(ctx, c); h == newLeaderNode {
		t.Errorf("%s stopped but still holds the Lease: it did not release it", newLeaderNode)
	}
	followerNode := "node-b"
	if follower == cc {
		followerNode = "node-c"
	}
	ev = waitEvent(ctx, t, c, followerNode, "P2PDisconnected")
	if ev.Type != corev1.EventTypeWarning {
		t.Errorf("P2PDisconnected type %s, want Warning", ev.Type)
	}
	until(t, 60*time.Second, followerNode+" to lead alone", func() (bool, string) {
		h := leaseHolder(ctx, c)
		return h == followerNode, h
	})
	waitReady(t, follower.Node)

	// Without the chart's RBAC the node cannot take part, and /readyz says why.
	lost := startP2PNode(t, "--bootstrap-mode=k8s-lease", "--kubeconfig="+api.Kubeconfig(t, "system:serviceaccount:peerd:unbound"),
		"--node-name=node-x", "--namespace=peerd", "--lease-duration=4s")
	until(t, 30*time.Second, "/readyz to name the RBAC problem", func() (bool, string) {
		code, _, body := Get(t, "GET", lost.URL("/readyz"), nil)
		return code != 200 && strings.Contains(string(body), "forbidden"), fmt.Sprintf("%d %s", code, body)
	})
	lost.Stop()

	// A fatal error after start (its HTTP port is taken) ends the process
	// and leaves P2PFailed on its Node.
	ip := NextIP()
	held, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	cmd := exec.CommandContext(ctx, peerdBin, "run", "--data-dir="+t.TempDir(), "--http-addr="+held.Addr().String(),
		"--p2p-addr=/ip4/"+ip+"/tcp/0", "--mount=", "--containerd-socket=",
		"--kubeconfig="+kubeconfig, "--node-name=node-a", "--namespace=peerd", "--bootstrap-mode=static")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("peerd ran with its HTTP port taken:\n%s", out)
	}
	ev = waitEvent(ctx, t, c, "node-a", "P2PFailed")
	if ev.Type != corev1.EventTypeWarning || !strings.Contains(ev.Message, "address already in use") {
		t.Errorf("P2PFailed: type %s message %q, want a Warning naming the cause", ev.Type, ev.Message)
	}
}

// applyChartRBAC creates the chart's ServiceAccount, Role, ClusterRole and
// bindings, so peerd runs with exactly the rights the chart grants.
func applyChartRBAC(ctx context.Context, t *testing.T, api *kubeAPI) {
	t.Helper()
	objs := renderChart(t, "fullnameOverride: peerd\nbootstrap: {mode: k8s-lease}\n")
	n := 0
	for _, o := range objs {
		var err error
		switch o.u.GetKind() {
		case "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount":
			if o.u.GetAnnotations()["helm.sh/hook"] != "" {
				continue // the uninstall hook's own account
			}
			err = createUnstructured(ctx, api, o.u)
			n++
		}
		if err != nil {
			t.Fatalf("create %s %s: %v", o.u.GetKind(), o.u.GetName(), err)
		}
	}
	if n != 5 {
		t.Fatalf("applied %d RBAC objects, want 5 (ServiceAccount, Role, RoleBinding, ClusterRole, ClusterRoleBinding)", n)
	}
}

func createUnstructured(ctx context.Context, api *kubeAPI, u *unstructured.Unstructured) error {
	body, err := json.Marshal(u.Object)
	if err != nil {
		return err
	}
	var path string
	switch u.GetKind() {
	case "ServiceAccount":
		path = "/api/v1/namespaces/" + u.GetNamespace() + "/serviceaccounts"
	case "Role", "RoleBinding":
		path = "/apis/rbac.authorization.k8s.io/v1/namespaces/" + u.GetNamespace() + "/" + strings.ToLower(u.GetKind()) + "s"
	default:
		path = "/apis/rbac.authorization.k8s.io/v1/" + strings.ToLower(u.GetKind()) + "s"
	}
	return api.Admin.RESTClient().Post().AbsPath(path).Body(body).SetHeader("Content-Type", "application/json").Do(ctx).Error()
}

func leaseHolder(ctx context.Context, c kubernetes.Interface) string {
	l, err := c.CoordinationV1().Leases("peerd").Get(ctx, "peerd-bootstrap", metav1.GetOptions{})
	if err != nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

// leaseAddrs returns the peer ID and addresses the holder published on the Lease.
func leaseAddrs(ctx context.Context, t *testing.T, c kubernetes.Interface) (string, []string) {
	t.Helper()
	l, err := c.CoordinationV1().Leases("peerd").Get(ctx, "peerd-bootstrap", metav1.GetOptions{})
	if err != nil {
		return "", nil
	}
	var info struct {
		Holder string   `json:"holder"`
		PeerID string   `json:"peerID"`
		Addrs  []string `json:"addrs"`
	}
	if raw := l.Annotations["peerd.io/leader"]; raw != "" {
		if err := json.Unmarshal([]byte(raw), &info); err != nil {
			t.Fatalf("Lease annotation %q: %v", raw, err)
		}
	}
	if l.Spec.HolderIdentity == nil || info.Holder != *l.Spec.HolderIdentity {
		return "", nil
	}
	return info.PeerID, info.Addrs
}

func events(ctx context.Context, t *testing.T, c kubernetes.Interface, node, reason string) []corev1.Event {
	t.Helper()
	list, err := c.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.kind=Node,involvedObject.name=" + node + ",reason=" + reason,
	})
	if err != nil {
		t.Fatalf("list events: %v", err)
	}
	return list.Items
}

func waitEvent(ctx context.Context, t *testing.T, c kubernetes.Interface, node, reason string) corev1.Event {
	t.Helper()
	var got []corev1.Event
	until(t, 30*time.Second, reason+" on "+node, func() (bool, string) {
		got = events(ctx, t, c, node, reason)
		return len(got) > 0, "none"
	})
	return got[0]
}

// TestK8sDNSBootstrap: --bootstrap-mode dns learns peer IDs by dialing the
// addresses a name resolves to; no Kubernetes API is needed (Events off).
// IP literals stand in for the headless Service name: they resolve to
// themselves, and the test must not depend on the machine's DNS.
func TestK8sDNSBootstrap(t *testing.T) {
	// Nothing answers at the name: not ready, and /readyz says why.
	a := startP2PNode(t, "--bootstrap-mode=dns", "--dns-name=127.0.0.1:1")
	until(t, 10*time.Second, "a failed dns bootstrap round", func() (bool, string) {
		return strings.Contains(a.Log(), "bootstrap round failed"), "not yet"
	})
	code, _, body := Get(t, "GET", a.URL("/readyz"), nil)
	if code == 200 || !strings.Contains(string(body), "dns bootstrap") {
		t.Fatalf("/readyz with nobody at --dns-name: %d %q, want a dns bootstrap error", code, body)
	}

	// b's name resolves to a: b learns a's peer ID by dialing it, and joins.
	ip, port := p2pHostPort(t, a.P2PAddr)
	b := startP2PNode(t, "--bootstrap-mode=dns", "--dns-name="+ip+":"+port)
	waitReady(t, b.Node)
	until(t, 30*time.Second, "b to connect to a", func() (bool, string) {
		return logHasLine(b.Node, "connected to bootstrap peer", "peer="+a.ID), "not yet"
	})
	waitReady(t, a.Node) // found by b: a joined too

	// A name that resolves only to the node itself: alone, and ready.
	cip := NextIP()
	cport := FreePort(t, cip)
	c := StartNode(t, NodeOpts{IP: cip, Args: []string{
		"--p2p-addr=/ip4/" + cip + "/tcp/" + fmt.Sprint(cport),
		"--bootstrap-mode=dns", "--dns-name=" + cip,
	}})
	waitReady(t, c)
	if got := c.Metric(t, "peerd_bootstrap_rounds_total", "mode=dns", "result=alone"); got < 1 {
		t.Errorf("alone rounds = %v, want >= 1", got)
	}
	for _, n := range []*Node{a.Node, b.Node, c} {
		if k := strings.Count(n.Log(), "Kubernetes Events are off"); k != 1 {
			t.Errorf("%s logged the Events-off notice %d times, want once", n.Name, k)
		}
	}
}

// p2pHostPort splits /ip4/<ip>/tcp/<port>/p2p/<id>.
func p2pHostPort(t *testing.T, ma string) (string, string) {
	t.Helper()
	f := strings.Split(ma, "/")
	if len(f) < 5 || f[1] != "ip4" || f[3] != "tcp" {
		t.Fatalf("unexpected multiaddr %q", ma)
	}
	return f[2], f[4]
}

// logHasLine reports whether one line of n's log contains every part.
func logHasLine(n *Node, parts ...string) bool {
	for _, line := range strings.Split(n.Log(), "\n") {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			return true
		}
	}
	return false
}
