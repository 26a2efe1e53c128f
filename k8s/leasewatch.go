package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
)

// leaseLister is what leaseWatch needs of the Leases client.
type leaseLister interface {
	List(context.Context, metav1.ListOptions) (*coordinationv1.LeaseList, error)
	Watch(context.Context, metav1.ListOptions) (watch.Interface, error)
}

// leaseWatch keeps the bootstrap Lease as one watch last delivered it, so
// that a node which does not hold the Lease reads it from memory every retry
// period instead of asking the API server: with every node polling, N nodes
// send N/2 requests per second (2,500/s at 5,000 nodes); watching, the API
// server sends each change once to each node from its watch cache.
type leaseWatch struct {
	client leaseLister
	name   string
	log    *slog.Logger

	mu     sync.Mutex
	synced bool                  // lease is what the API server holds now
	lease  *coordinationv1.Lease // nil: no such Lease
	bypass bool                  // the next read goes to the API server
	warned bool
}

func newLeaseWatch(client leaseLister, name string, log *slog.Logger) *leaseWatch {
	return &leaseWatch{client: client, name: name, log: log}
}

// current is the Lease as last watched (nil when none exists); ok is false
// while the watch is not in sync, or once after stale, and the caller must
// ask the API server.
func (w *leaseWatch) current() (lease *coordinationv1.Lease, ok bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.synced || w.bypass {
		w.bypass = false
		return nil, false
	}
	if w.lease == nil {
		return nil, true
	}
	return w.lease.DeepCopy(), true
}

// stale says the API server answered differently from the watched copy (an
// update conflicted, a create found the Lease): the next read asks the API
// server. The watch itself is left alone: it is usually only a moment behind
// the change that won; one that died silently is replaced when it times out.
func (w *leaseWatch) stale() {
	w.mu.Lock()
	w.bypass = true
	w.mu.Unlock()
}

func (w *leaseWatch) set(lease *coordinationv1.Lease, synced bool) {
	w.mu.Lock()
	w.lease, w.synced = lease, synced
	w.mu.Unlock()
}

func (w *leaseWatch) unsync() {
	w.mu.Lock()
	w.synced = false
	w.mu.Unlock()
}

// run lists the Lease and follows it until ctx ends, listing again whenever
// a watch ends; failures back off from 1 s to 1 min, and meanwhile reads go
// to the API server as before.
func (w *leaseWatch) run(ctx context.Context) {
	backoff := time.Second
	for ctx.Err() == nil {
		err := w.listAndFollow(ctx)
		w.unsync()
		if ctx.Err() != nil {
			return
		}
		wait := 100*time.Millisecond + rand.N(400*time.Millisecond)
		if err != nil {
			w.mu.Lock()
			first := !w.warned
			w.warned = true
			w.mu.Unlock()
			if first {
				w.log.Warn("cannot watch the bootstrap Lease; reading it every retry period instead", "err", err)
			} else {
				w.log.Debug("bootstrap Lease watch failed", "err", err)
			}
			wait = backoff/2 + rand.N(backoff/2+1)
			backoff = min(2*backoff, time.Minute)
		} else {
			backoff = time.Second
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
}

// listAndFollow lists the one Lease, then applies its watch events until
// the watch ends (its timeout, an error, or ctx). The watch asks the server
// to end it after 30 to 60 minutes (as the API server does for watches that
// name no timeout), so that 5,000 nodes list again about twice a second in
// all; a connection that dies silently is caught sooner by the client's
// HTTP/2 health checks.
func (w *leaseWatch) listAndFollow(ctx context.Context) error {
	sel := fields.OneTermEqualSelector("metadata.name", w.name).String()
	lctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	list, err := w.client.List(lctx, metav1.ListOptions{FieldSelector: sel})
	cancel()
	if err != nil {
		return fmt.Errorf("list: %w", err)
	}
	var lease *coordinationv1.Lease
	for i := range list.Items {
		if list.Items[i].Name == w.name {
			lease = list.Items[i].DeepCopy()
		}
	}
	secs := int64(1800 + rand.N(1800))
	wctx, cancel := context.WithTimeout(ctx, time.Duration(secs)*time.Second+30*time.Second)
	defer cancel()
	wi, err := w.client.Watch(wctx, metav1.ListOptions{FieldSelector: sel, ResourceVersion: list.ResourceVersion, TimeoutSeconds: &secs})
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	defer wi.Stop()
	// Synced only once the watch is open: a change between the list and the
	// watch arrives as its first event.
	w.set(lease, true)
	for {
		select {
		case <-wctx.Done():
			return nil
		case ev, ok := <-wi.ResultChan():
			if !ok {
				return nil
			}
			switch ev.Type {
			case watch.Added, watch.Modified:
				if l, ok := ev.Object.(*coordinationv1.Lease); ok && l.Name == w.name {
					w.set(l.DeepCopy(), true)
				}
			case watch.Deleted:
				if l, ok := ev.Object.(*coordinationv1.Lease); ok && l.Name == w.name {
					w.set(nil, true)
				}
			case watch.Error:
				if st := apierrors.FromObject(ev.Object); st != nil {
					return fmt.Errorf("watch: %w", st)
				}
				return errors.New("watch: error event")
			}
		}
	}
}
