package k8s

import (
	"context"
	"fmt"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// DaemonSetDone reports whether every pod a DaemonSet wants is scheduled,
// runs its current template, and is ready — for a cleanup DaemonSet whose
// init container does the work, that means every node is done.
func DaemonSetDone(ds *appsv1.DaemonSet) (bool, string) {
	st := ds.Status
	switch {
	case st.ObservedGeneration < ds.Generation:
		return false, "the controller has not seen the latest spec"
	case st.UpdatedNumberScheduled < st.DesiredNumberScheduled:
		return false, fmt.Sprintf("%d of %d pods updated", st.UpdatedNumberScheduled, st.DesiredNumberScheduled)
	case st.NumberReady < st.DesiredNumberScheduled:
		return false, fmt.Sprintf("%d of %d pods ready", st.NumberReady, st.DesiredNumberScheduled)
	}
	return true, fmt.Sprintf("%d of %d pods ready", st.NumberReady, st.DesiredNumberScheduled)
}

// WaitDaemonSet polls a DaemonSet until DaemonSetDone or ctx ends.
func WaitDaemonSet(ctx context.Context, c kubernetes.Interface, namespace, name string, every time.Duration, progress func(string)) error {
	t := time.NewTicker(every)
	defer t.Stop()
	last := ""
	for {
		gctx, cancel := context.WithTimeout(ctx, every+10*time.Second)
		ds, err := c.AppsV1().DaemonSets(namespace).Get(gctx, name, metav1.GetOptions{})
		cancel()
		state := ""
		if err != nil {
			state = "read DaemonSet: " + err.Error()
		} else {
			var done bool
			done, state = DaemonSetDone(ds)
			if done {
				progress(state)
				return nil
			}
		}
		if state != last {
			progress(state)
			last = state
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("DaemonSet %s/%s: %s: %w", namespace, name, state, context.Cause(ctx))
		case <-t.C:
		}
	}
}
