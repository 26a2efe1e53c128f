package p2p

import (
	"slices"
	"sync"
	"time"
)

const (
	// Hedge delay bounds; in between it follows the observed first-byte times.
	minHedge, maxHedge, initialHedge = 5 * time.Millisecond, 500 * time.Millisecond, 50 * time.Millisecond
)

// latencies keeps recent first-byte times to set the hedge delay: about
// twice the 90th percentile, so only a clearly slow provider is hedged.
type latencies struct {
	mu  sync.Mutex
	buf [128]time.Duration
	n   int
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.buf[l.n%len(l.buf)] = d
	l.n++
	l.mu.Unlock()
}

func (l *latencies) hedgeDelay() time.Duration {
	l.mu.Lock()
	cnt := min(l.n, len(l.buf))
	if cnt < 8 {
		l.mu.Unlock()
		return initialHedge
	}
	s := make([]time.Duration, cnt)
	copy(s, l.buf[:cnt])
	l.mu.Unlock()
	slices.Sort(s)
	d := 2 * s[cnt*9/10]
	return min(max(d, minHedge), maxHedge)
}
