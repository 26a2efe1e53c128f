package k8s

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func TestMisconfiguredOncePerCheckPerHour(t *testing.T) {
	c := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", UID: "uid-a"}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := NewEvents(ctx, EventsOptions{Client: c, NodeName: "node-a"})
	defer e.Close()
	m := NewMisconfigured(e, 0)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	m.now = func() time.Time { return now }

	if !m.Report("config_path", "no config_path", "set it") {
		t.Fatal("first failure of a check not reported")
	}
	now = now.Add(59 * time.Minute)
	if m.Report("config_path", "no config_path", "set it") {
		t.Error("the same check reported twice within the hour")
	}
	if !m.Report("p2p_reachable", "port 30001 dropped", "open it") {
		t.Error("another check's failure was held back")
	}
	now = now.Add(2 * time.Minute)
	if !m.Report("config_path", "no config_path", "set it") {
		t.Error("a check failing for over an hour was not reported again")
	}
	var evs []corev1.Event
	eventually(t, "P2PMisconfigured events for both checks", func() bool {
		evs = eventsByReason(t, c)[ReasonMisconfigured]
		return len(evs) >= 2 // the recorder folds identical ones into a count
	})
	seen := map[string]bool{}
	for _, ev := range evs {
		if ev.Type != corev1.EventTypeWarning || ev.InvolvedObject.Name != "node-a" {
			t.Errorf("event %+v: want a Warning on node-a", ev)
		}
		for _, c := range []string{"config_path", "p2p_reachable"} {
			if strings.Contains(ev.Message, "check "+c+" failed") && strings.Contains(ev.Message, "fix: ") {
				seen[c] = true
			}
		}
	}
	if len(seen) != 2 {
		t.Errorf("events %+v do not name both failing checks with their fix", evs)
	}

	off := NewMisconfigured(NewEvents(ctx, EventsOptions{}), 0)
	if off.Report("x", "y", "z") {
		t.Error("reported without a Kubernetes client")
	}
}
