package k8s

import (
	"context"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func TestDaemonSetDone(t *testing.T) {
	ds := func(gen, observed int64, desired, updated, ready int32) *appsv1.DaemonSet {
		return &appsv1.DaemonSet{
			ObjectMeta: metav1.ObjectMeta{Name: "c", Namespace: "n", Generation: gen},
			Status: appsv1.DaemonSetStatus{ObservedGeneration: observed, DesiredNumberScheduled: desired,
				UpdatedNumberScheduled: updated, NumberReady: ready},
		}
	}
	for _, tc := range []struct {
		name string
		ds   *appsv1.DaemonSet
		want bool
	}{
		{"not observed yet", ds(1, 0, 0, 0, 0), false},
		{"pods not ready", ds(1, 1, 3, 3, 2), false},
		{"old pods", ds(2, 2, 3, 1, 3), false},
		{"all ready", ds(1, 1, 3, 3, 3), true},
		{"no node matches", ds(1, 1, 0, 0, 0), true},
	} {
		if got, why := DaemonSetDone(tc.ds); got != tc.want {
			t.Errorf("%s: done=%v (%s), want %v", tc.name, got, why, tc.want)
		}
	}
}

func TestWaitDaemonSet(t *testing.T) {
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "c", Namespace: "n", Generation: 1},
		Status:     appsv1.DaemonSetStatus{ObservedGeneration: 1, DesiredNumberScheduled: 2, UpdatedNumberScheduled: 2, NumberReady: 1},
	}
	c := fake.NewClientset(ds)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- WaitDaemonSet(ctx, c, "n", "c", 5*time.Millisecond, func(string) {}) }()
	select {
	case err := <-done:
		t.Fatalf("returned while a pod was not ready: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	ds.Status.NumberReady = 2
	if _, err := c.AppsV1().DaemonSets("n").UpdateStatus(ctx, ds, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Timing out names the state it was stuck in.
	short, cancel2 := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel2()
	if err := WaitDaemonSet(short, c, "n", "missing", 5*time.Millisecond, func(string) {}); err == nil {
		t.Fatal("no error for a DaemonSet that never appears")
	}
}
