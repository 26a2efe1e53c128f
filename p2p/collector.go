package p2p

import (
	"context"
	"runtime"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
)

const (
	// After its first provider a lookup keeps collecting for providerGrace.
	// One whose caller waits for that first provider stops sooner, at the
	// first pause of providerGap (one answer carries every provider its peer
	// knows): waiting for later answers costs the DHT query's work on this
	// node (up to its concurrency of requests in flight) while the caller is
	// already reading from the first provider. See dhtFinder.
	providerGrace = 2 * time.Millisecond
	providerGap   = 200 * time.Microsecond
)

// dhtFinder finds providers on the node's DHT.
type dhtFinder struct{ n *Node }

func (f *dhtFinder) FindProviders(ctx context.Context, k blob.Key, first func([]peer.AddrInfo)) ([]peer.AddrInfo, error) {
	c, err := KeyToCID(k)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // stops the DHT query when we return early
	// A caller waiting for the first provider (first != nil) goes on with it
	// and the rest are for failover: stop at the first pause. Swarm and
	// background lookups split chunks over the whole list: collect for the
	// whole grace.
	gap := providerGrace
	if first != nil {
		gap = providerGap
	}
	return collectProviders(ctx, f.n.dht.FindProvidersAsync(ctx, c, 16), f.n.host.ID(), first, providerGrace, gap), nil
}

// collectProviders reads a lookup's providers from ch until it closes, ctx
// ends, no provider came for gap since the last one, or grace passed since
// the first (gap <= 0: no bound on pauses). first, when not nil, is called
// with the first provider. Records of self are dropped and start no timer:
// the DHT hands out the node's own record (a pull advertises when it
// starts) before any peer answered, and a grace counted from it would end
// a lookup on a busy node before the holders' answers arrive, as "nobody".
func collectProviders(ctx context.Context, ch <-chan peer.AddrInfo, self peer.ID, first func([]peer.AddrInfo), grace, gap time.Duration) []peer.AddrInfo {
	var out []peer.AddrInfo
	var graceC, gapC <-chan time.Time
	var gapT *time.Timer
	for {
		select {
		case ai, ok := <-ch:
			if !ok {
				return out
			}
			if ai.ID == self {
				continue
			}
			out = append(out, ai)
			if graceC == nil {
				if first != nil {
					first(out)
					// Let the caller that first woke run now: otherwise it
					// waits behind the hand-offs of the rest of this answer
					// (each provider readies the DHT goroutine sending the
					// next, which takes the woken caller's turn).
					runtime.Gosched()
				}
				t := time.NewTimer(grace)
				defer t.Stop()
				graceC = t.C
				if gap > 0 {
					gapT = time.NewTimer(gap)
					defer gapT.Stop()
					gapC = gapT.C
				}
			} else if gapT != nil {
				resetTimer(gapT, gap)
			}
		case <-gapC:
			return out
		case <-graceC:
			return out
		case <-ctx.Done():
			return out
		}
	}
}
