package p2p

import (
	"context"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/peerd-project/peerd/blob"
)

const (
	provideWorkers = 16
	provideTimeout = 30 * time.Second
	retryMin       = 2 * time.Second
	retryMax       = 5 * time.Minute
)

// advertiser keeps the blobs this node holds advertised on the DHT: at once
// when the cache starts holding one, again every interval, retried with
// backoff after a failure, and no more once the cache dropped it (its
// records then expire on the other nodes).
type advertiser struct {
	provide  func(ctx context.Context, c cid.Cid) error
	canRun   func() bool // false while the routing table is empty
	interval time.Duration
	m        *metrics
	n        *Node

	mu   sync.Mutex
	keys map[blob.Key]*adState
	wake chan struct{}
	now  func() time.Time
}

type adState struct {
	due   time.Time
	fails int
	busy  bool
}

func newAdvertiser(n *Node, interval time.Duration) *advertiser {
	a := &advertiser{n: n, m: n.m, interval: interval, keys: map[blob.Key]*adState{}, wake: make(chan struct{}, 1), now: time.Now}
	a.provide = func(ctx context.Context, c cid.Cid) error { return n.dht.Provide(ctx, c, true) }
	a.canRun = func() bool { return n.RoutingTableSize() > 0 }
	return a
}

func (a *advertiser) add(k blob.Key) {
	if !k.Verifiable() {
		return
	}
	a.mu.Lock()
	if _, ok := a.keys[k]; ok {
		a.mu.Unlock()
		return
	}
	a.keys[k] = &adState{due: a.now()}
	a.m.advertised.Set(float64(len(a.keys)))
	a.mu.Unlock()
	a.kick()
}

func (a *advertiser) remove(k blob.Key) {
	a.mu.Lock()
	delete(a.keys, k)
	a.m.advertised.Set(float64(len(a.keys)))
	a.mu.Unlock()
}

func (a *advertiser) kick() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// due takes the keys whose advertisement is due and reports when the next
// one will be.
func (a *advertiser) due() ([]blob.Key, time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.now()
	var ks []blob.Key
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

func (a *advertiser) run(ctx context.Context) {
	for {
		wait := time.Second // re-check while the routing table is empty
		if a.canRun() {
			ks, next := a.due()
			if len(ks) > 0 {
				a.batch(ctx, ks)
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
// parallel so a burst of new blobs costs about one lookup's time.
func (a *advertiser) batch(ctx context.Context, ks []blob.Key) {
	start := a.now()
	work := make(chan blob.Key)
	var wg sync.WaitGroup
	var okN, failN int
	var cmu sync.Mutex
	for w := 0; w < min(provideWorkers, len(ks)); w++ {
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
	if ctx.Err() == nil && a.n != nil {
		a.n.log.Debug("advertised blobs", "ok", okN, "failed", failN, "took", a.now().Sub(start))
	}
}

func (a *advertiser) one(ctx context.Context, k blob.Key) bool {
	var err error
	c, cerr := KeyToCID(k)
	if cerr != nil {
		err = cerr
	} else if ctx.Err() == nil {
		pctx, cancel := context.WithTimeout(ctx, provideTimeout)
		start := a.now()
		err = a.provide(pctx, c)
		cancel()
		a.m.provideSecs.Observe(a.now().Sub(start).Seconds())
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
		a.m.provides.WithLabelValues("ok").Inc()
		st.fails = 0
		st.due = a.now().Add(a.interval)
		return true
	}
	if ctx.Err() != nil {
		return false
	}
	a.m.provides.WithLabelValues("error").Inc()
	st.fails++
	back := retryMin << min(st.fails-1, 10)
	st.due = a.now().Add(min(back, retryMax))
	if a.n != nil {
		a.n.log.Warn("advertise blob failed; will retry", "key", k, "in", min(back, retryMax), "err", err)
	}
	return false
}
