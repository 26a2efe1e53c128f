package p2p

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus"
)

const (
	provideWorkers = 16
	provideTimeout = 30 * time.Second
	retryMin       = 2 * time.Second
	retryMax       = 5 * time.Minute
)

// advertiser keeps a set of keys advertised on the DHT: at once when a key
// joins the set, again every interval, retried with backoff after a
// failure, and no more once it left the set (its records then expire on the
// other nodes). Blobs and tags each have one.
type advertiser[K comparable] struct {
	what     string // "blob" or "tag", for logs
	toCID    func(K) (cid.Cid, error)
	accept   func(K) bool // nil: every key
	provide  func(ctx context.Context, c cid.Cid) error
	canRun   func() bool // false while the routing table is empty
	interval time.Duration
	workers  int

	provides    *prometheus.CounterVec // result: ok, error
	advertised  prometheus.Gauge
	provideSecs prometheus.Observer // may be nil
	log         *slog.Logger        // may be nil

	mu   sync.Mutex
	keys map[K]*adState
	wake chan struct{}
	now  func() time.Time
}

type adState struct {
	due   time.Time
	fails int
	busy  bool
}

func newAdvertiser[K comparable](what string, toCID func(K) (cid.Cid, error), interval time.Duration, workers int,
	provides *prometheus.CounterVec, advertised prometheus.Gauge) *advertiser[K] {
	return &advertiser[K]{what: what, toCID: toCID, interval: interval, workers: workers, provides: provides,
		advertised: advertised, keys: map[K]*adState{}, wake: make(chan struct{}, 1), now: time.Now,
		canRun: func() bool { return true }}
}

// newBlobAdvertiser advertises the digests the node's stores hold.
func newBlobAdvertiser(n *Node, interval time.Duration) *advertiser[blob.Key] {
	a := newAdvertiser("blob", KeyToCID, interval, provideWorkers, n.m.provides, n.m.advertised)
	a.accept = blob.Key.Verifiable
	a.provideSecs = n.m.provideSecs
	a.log = n.log
	a.provide = func(ctx context.Context, c cid.Cid) error { return n.dht.Provide(ctx, c, true) }
	a.canRun = func() bool { return n.RoutingTableSize() > 0 }
	return a
}

func (a *advertiser[K]) add(k K) {
	if a.accept != nil && !a.accept(k) {
		return
	}
	a.mu.Lock()
	if _, ok := a.keys[k]; ok {
		a.mu.Unlock()
		return
	}
	a.keys[k] = &adState{due: a.now()}
	a.advertised.Set(float64(len(a.keys)))
	a.mu.Unlock()
	a.kick()
}

func (a *advertiser[K]) remove(k K) {
	a.mu.Lock()
	delete(a.keys, k)
	a.advertised.Set(float64(len(a.keys)))
	a.mu.Unlock()
}

// set replaces the whole set: new keys are advertised at once, dropped ones
// no more.
func (a *advertiser[K]) set(want map[K]bool) {
	a.mu.Lock()
	added := false
	for k := range a.keys {
		if !want[k] {
			delete(a.keys, k)
		}
	}
	for k := range want {
		if _, ok := a.keys[k]; !ok && (a.accept == nil || a.accept(k)) {
			a.keys[k] = &adState{due: a.now()}
			added = true
		}
	}
	a.advertised.Set(float64(len(a.keys)))
	a.mu.Unlock()
	if added {
		a.kick()
	}
}

// list returns the keys in the set.
func (a *advertiser[K]) list() []K {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]K, 0, len(a.keys))
	for k := range a.keys {
		out = append(out, k)
	}
	return out
}

func (a *advertiser[K]) kick() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// due takes the keys whose advertisement is due and reports when the next
// one will be.
func (a *advertiser[K]) due() ([]K, time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.now()
	var ks []K
	next := time.Duration(-1)
	for k, st := range a.keys {
		if st.busy {
			continue
		}
		if !st.due.After(now) {
			st.busy = true
			ks = append(ks, k)
			continue
		}
		if d := st.due.Sub(now); next < 0 || d < next {
			next = d
		}
	}
	return ks, next
}

func (a *advertiser[K]) run(ctx context.Context) {
	for {
		wait := time.Second // re-check while the routing table is empty
		if a.canRun() {
			ks, next := a.due()
			if len(ks) > 0 {
				a.batch(ctx, ks)
				if ctx.Err() != nil {
					return
				}
				continue
			}
			wait = next
			if wait < 0 {
				wait = time.Hour
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-a.wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// batch advertises many keys concurrently; per-key Provide calls run in
// parallel so a burst of new keys costs about one lookup's time.
func (a *advertiser[K]) batch(ctx context.Context, ks []K) {
	start := a.now()
	work := make(chan K)
	var wg sync.WaitGroup
	var okN, failN int
	var cmu sync.Mutex
	for w := 0; w < min(a.workers, len(ks)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range work {
				ok := a.one(ctx, k)
				cmu.Lock()
				if ok {
					okN++
				} else {
					failN++
				}
				cmu.Unlock()
			}
		}()
	}
	for _, k := range ks {
		select {
		case work <- k:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	close(work)
	wg.Wait()
	if ctx.Err() == nil && a.log != nil {
		a.log.Debug("advertised", "what", a.what, "ok", okN, "failed", failN, "took", a.now().Sub(start))
	}
}

func (a *advertiser[K]) one(ctx context.Context, k K) bool {
	var err error
	c, cerr := a.toCID(k)
	if cerr != nil {
		err = cerr
	} else if ctx.Err() == nil {
		pctx, cancel := context.WithTimeout(ctx, provideTimeout)
		start := a.now()
		err = a.provide(pctx, c)
		cancel()
		if a.provideSecs != nil {
			a.provideSecs.Observe(a.now().Sub(start).Seconds())
		}
	} else {
		err = ctx.Err()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	st := a.keys[k]
	if st == nil { // removed meanwhile
		return err == nil
	}
	st.busy = false
	if err == nil {
		a.provides.WithLabelValues("ok").Inc()
		st.fails = 0
		st.due = a.now().Add(a.interval)
		return true
	}
	if ctx.Err() != nil {
		return false
	}
	a.provides.WithLabelValues("error").Inc()
	st.fails++
	back := min(retryMin<<min(st.fails-1, 10), retryMax)
	st.due = a.now().Add(back)
	if a.log != nil {
		a.log.Warn("advertise failed; will retry", "what", a.what, "key", k, "in", back, "err", err)
	}
	return false
}
