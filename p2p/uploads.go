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

// BusyError is a provider's busy answer.
type BusyError struct {
	Peer       peer.ID
	RetryAfter time.Duration
}

func (e *BusyError) Error() string {
	return fmt.Sprintf("peer %s is busy (retry after %s)", e.Peer, e.RetryAfter)
}

func (e *BusyError) Is(target error) bool { return target == errBusy }

// retryAfter reads a Retry-After of whole seconds, bounded to [100ms, 5s].
func retryAfter(h string) time.Duration {
	s, err := strconv.Atoi(h)
	if err != nil || s < 0 {
		return time.Second
	}
	return min(max(time.Duration(s)*time.Second, 100*time.Millisecond), 5*time.Second)
}
