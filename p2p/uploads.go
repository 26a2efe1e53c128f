package p2p

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
)

// DefaultUploadStreams bounds the transfers a node serves peers at once.
const DefaultUploadStreams = 128

// uploads admits peer transfers: at most streams at once, each asker at
// most its fair share of them while others wait (streams divided by the
// askers being served, at least one), and every byte through one token
// bucket when a rate is set. A transfer not admitted is answered "busy"
// (503 + Retry-After) at once: the asker goes to another provider.
type uploads struct {
	streams int
	limit   *rate.Limiter // nil: no rate cap
	gauge   prometheus.Gauge

	mu     sync.Mutex
	total  int
	byPeer map[peer.ID]int
}

func newUploads(streams int, bytesPerSec int64, gauge prometheus.Gauge) *uploads {
	if streams <= 0 {
		streams = DefaultUploadStreams
	}
	u := &uploads{streams: streams, gauge: gauge, byPeer: map[peer.ID]int{}}
	if bytesPerSec > 0 {
		// A burst of one read size lets a transfer start at once; beyond
		// it the bucket paces every transfer of the node together.
		u.limit = rate.NewLimiter(rate.Limit(bytesPerSec), int(min(bytesPerSec, uploadPiece)))
	}
	return u
}

// uploadPiece is the most bytes one transfer takes from the bucket at once:
// small enough that transfers take turns, large enough to cost nothing.
const uploadPiece = 64 << 10

// admit takes a slot for p, or reports false when the node is at its
// stream bound or p at its share.
func (u *uploads) admit(p peer.ID) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	askers := len(u.byPeer)
	if u.byPeer[p] == 0 {
		askers++
	}
	share := max(1, u.streams/askers)
	if u.total >= u.streams || u.byPeer[p] >= share {
		return false
	}
	u.total++
	u.byPeer[p]++
	if u.gauge != nil {
		u.gauge.Set(float64(u.total))
	}
	return true
}

func (u *uploads) release(p peer.ID) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.total--
	if u.byPeer[p]--; u.byPeer[p] <= 0 {
		delete(u.byPeer, p)
	}
	if u.gauge != nil {
		u.gauge.Set(float64(u.total))
	}
}

// paced wraps a transfer's body so its reads take their bytes from the
// node's bucket; without a rate it is r itself.
func (u *uploads) paced(ctx context.Context, r io.ReadCloser) io.ReadCloser {
	if u.limit == nil {
		return r
	}
	return &pacedReader{ctx: ctx, r: r, l: u.limit}
}

type pacedReader struct {
	ctx context.Context
	r   io.ReadCloser
	l   *rate.Limiter
}

func (p *pacedReader) Read(b []byte) (int, error) {
	if len(b) > uploadPiece {
		b = b[:uploadPiece]
	}
	if len(b) > p.l.Burst() {
		b = b[:p.l.Burst()]
	}
	if err := p.l.WaitN(p.ctx, len(b)); err != nil {
		return 0, err
	}
	return p.r.Read(b)
}

func (p *pacedReader) Close() error { return p.r.Close() }

// errBusy marks a provider's "busy" answer: not a failure (no avoidance),
// try another provider, or this one again after RetryAfter.
var errBusy = errors.New("provider busy")

// BusyError is a provider's busy answer. Reason is the holder's
// busyHeader: "streams" (or empty, from older nodes) when it is at its
// upload bound, "fanout" or "zone" when it serves this blob to enough
// askers already (those serve it on once verified).
type BusyError struct {
	Peer       peer.ID
	Reason     string
	RetryAfter time.Duration
	holders    []peer.AddrInfo // every provider of the round that sent the asker to wait for others
}

func (e *BusyError) Error() string {
	why := e.Reason
	if why == "" {
		why = "streams"
	}
	return fmt.Sprintf("peer %s is busy (%s; retry after %s)", e.Peer, why, e.RetryAfter)
}

// waitsForOthers reports whether the holder sent the asker to wait for
// other askers of the blob rather than because it is loaded: once the
// asker waited its turn it may insist.
func (e *BusyError) waitsForOthers() bool { return e.Reason == "fanout" || e.Reason == "zone" }

type insistKey struct{}

// insist marks ctx's peer requests as having waited their turn: holders
// serve them past their fan-out.
func insist(ctx context.Context) context.Context { return context.WithValue(ctx, insistKey{}, true) }

func insisting(ctx context.Context) bool { v, _ := ctx.Value(insistKey{}).(bool); return v }

func (e *BusyError) Is(target error) bool { return target == errBusy }

// retryAfter reads a busy answer's delay: retryMsHeader when present, else
// a Retry-After of whole seconds; bounded to [100ms, 5s].
func retryAfter(h, ms string) time.Duration {
	if v, err := strconv.Atoi(ms); err == nil && v >= 0 {
		return min(max(time.Duration(v)*time.Millisecond, 100*time.Millisecond), 5*time.Second)
	}
	s, err := strconv.Atoi(h)
	if err != nil || s < 0 {
		return time.Second
	}
	return min(max(time.Duration(s)*time.Second, 100*time.Millisecond), 5*time.Second)
}

// blobCopies is how many askers of its own zone (or of an unknown one) a
// holder of a whole, verified blob gives that blob to within copiesWindow,
// and one asker per other zone: the askers past it are told "busy" and
// read from the askers served first, which serve once they verified it
// (the trust rule), so a rollout's copies spread as a tree from many nodes
// instead of a star from the first holder. An asker keeps its turn until
// copiesWindow after its last request; one that waited its turn for
// fanoutWait (or --swarm-wait, if shorter) is served regardless
// (insistHeader).
const (
	blobCopies   = 2
	copiesWindow = 30 * time.Second
)

// fanoutRetry is the retry delay a fan-out busy answer suggests: askers
// look again soon for the askers served first, which serve once verified.
const fanoutRetry = 200 * time.Millisecond

// fanout tracks, per blob, the askers a whole holder gave it to lately.
type fanout struct {
	mu     sync.Mutex
	byBlob map[blob.Key]map[peer.ID]turn
}

// turn is an asker's claim on a blob: its zone ("" unknown) and its last
// request.
type turn struct {
	zone string
	last time.Time
}

// maxFanoutBlobs bounds the blobs tracked; past it the oldest are dropped.
const maxFanoutBlobs = 4096

// admit decides whether asker p (of zone askerZone) may be served blob k by
// this node (of zone mine) now. It returns "" and gives p its turn, or the
// reason it may not: "zone" when another asker of p's zone, not this node's,
// had its turn lately (one copy crosses, then p's zone shares it);
// "fanout" when blobCopies askers of this node's zone (or unknown ones) did.
func (f *fanout) admit(k blob.Key, p peer.ID, askerZone, mine string, insist bool, now time.Time) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.byBlob == nil {
		f.byBlob = map[blob.Key]map[peer.ID]turn{}
	}
	turns := f.byBlob[k]
	if turns == nil {
		if len(f.byBlob) >= maxFanoutBlobs {
			f.sweepLocked(now)
		}
		turns = map[peer.ID]turn{}
		f.byBlob[k] = turns
	}
	cross := askerZone != "" && mine != "" && askerZone != mine
	local := 0
	for id, t := range turns {
		switch {
		case now.Sub(t.last) >= copiesWindow:
			delete(turns, id)
		case id == p:
			turns[p] = turn{zone: askerZone, last: now}
			return ""
		case cross && t.zone == askerZone && !insist:
			return "zone"
		case t.zone == "" || mine == "" || t.zone == mine:
			local++
		}
	}
	if !cross && local >= blobCopies && !insist {
		return "fanout"
	}
	turns[p] = turn{zone: askerZone, last: now}
	return ""
}

// sweepLocked drops the turns past copiesWindow and the blobs left without
// any; if every blob still has a live turn, it drops them all (the bound
// keeps memory flat; the next askers start afresh).
func (f *fanout) sweepLocked(now time.Time) {
	for k, turns := range f.byBlob {
		for id, t := range turns {
			if now.Sub(t.last) >= copiesWindow {
				delete(turns, id)
			}
		}
		if len(turns) == 0 {
			delete(f.byBlob, k)
		}
	}
	if len(f.byBlob) >= maxFanoutBlobs {
		clear(f.byBlob)
	}
}
