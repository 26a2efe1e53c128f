package k8s

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func eventsByReason(t *testing.T, c *fake.Clientset) map[string][]corev1.Event {
	t.Helper()
	list, err := c.CoreV1().Events(metav1.NamespaceDefault).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]corev1.Event{}
	for _, e := range list.Items {
		out[e.Reason] = append(out[e.Reason], e)
	}
	return out
}

func TestEventsOnTheNode(t *testing.T) {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", UID: "uid-a"}}
	c := fake.NewClientset(node)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := NewEvents(ctx, EventsOptions{Client: c, NodeName: "node-a", ActiveEvery: time.Hour})
	defer e.Close()
	if !e.Enabled() {
		t.Fatal("events disabled with a client")
	}

	e.Peers(0) // still empty: nothing to say
	e.Peers(2)
	e.Peers(3) // still connected: nothing new
	e.BytesFromPeer("peer1", 100)
	e.BytesFromPeer("peer1", 100) // within ActiveEvery: folded into the next one
	e.Peers(0)
	e.Failed(ctx, errors.New("listen tcp :4001: address already in use"))

	var got map[string][]corev1.Event
	eventually(t, "four kinds of events", func() bool {
		got = eventsByReason(t, c)
		return len(got) == 4
	})
	want := map[string]struct {
		typ, msg string
	}{
		ReasonConnected:    {corev1.EventTypeNormal, "2 live peer(s)"},
		ReasonActive:       {corev1.EventTypeNormal, "received 100 bytes"},
		ReasonDisconnected: {corev1.EventTypeWarning, "no live peer"},
		ReasonFailed:       {corev1.EventTypeWarning, "address already in use"},
	}
	for reason, w := range want {
		evs := got[reason]
		if len(evs) != 1 {
			t.Fatalf("%s: %d events, want 1: %+v", reason, len(evs), evs)
		}
		ev := evs[0]
		if ev.Type != w.typ || !strings.Contains(ev.Message, w.msg) {
			t.Errorf("%s: type %s message %q, want %s containing %q", reason, ev.Type, ev.Message, w.typ, w.msg)
		}
		if ev.InvolvedObject.Kind != "Node" || ev.InvolvedObject.Name != "node-a" || ev.InvolvedObject.UID != "uid-a" {
			t.Errorf("%s: involved object %+v, want Node node-a uid-a", reason, ev.InvolvedObject)
		}
	}
}

func TestActiveIsRateLimited(t *testing.T) {
	c := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n"}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := NewEvents(ctx, EventsOptions{Client: c, NodeName: "n", ActiveEvery: 50 * time.Millisecond})
	defer e.Close()
	e.BytesFromPeer("p", 1)
	e.BytesFromPeer("p", 2) // suppressed, counted
	eventually(t, "first P2PActive", func() bool { return len(eventsByReason(t, c)[ReasonActive]) == 1 })
	time.Sleep(60 * time.Millisecond)
	e.BytesFromPeer("p", 4)
	eventually(t, "second P2PActive", func() bool { return len(eventsByReason(t, c)[ReasonActive]) == 2 })
	var msgs []string
	for _, ev := range eventsByReason(t, c)[ReasonActive] {
		msgs = append(msgs, ev.Message)
	}
	joined := strings.Join(msgs, "|")
	if !strings.Contains(joined, "received 1 bytes") || !strings.Contains(joined, "received 6 bytes") {
		t.Fatalf("messages %q: want 1 byte, then the 2+4 since", msgs)
	}
}

func TestEventsOffWithoutClient(t *testing.T) {
	e := NewEvents(context.Background(), EventsOptions{NodeName: "n"})
	if e.Enabled() {
		t.Fatal("enabled without a client")
	}
	// Every call is a harmless no-op.
	e.Peers(1)
	e.BytesFromPeer("p", 10)
	e.Failed(context.Background(), errors.New("x"))
	e.Close()
}

func TestEventsReadTheNodesZoneLabel(t *testing.T) {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n", UID: "u1", Labels: map[string]string{ZoneLabel: "eu-west-1b"}}}
	e := NewEvents(context.Background(), EventsOptions{Client: fake.NewClientset(node), NodeName: "n"})
	defer e.Close()
	if e.Zone() != "eu-west-1b" {
		t.Fatalf("zone %q, want the Node's label", e.Zone())
	}
	bare := NewEvents(context.Background(), EventsOptions{Client: fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n"}}), NodeName: "n"})
	defer bare.Close()
	if bare.Zone() != "" {
		t.Fatalf("zone %q for a Node without the label", bare.Zone())
	}
}
