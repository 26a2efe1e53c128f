package main

import (
	"net/http"
	"sync"
	"time"
)

// pacer is a token bucket shared by every connection of a throttled file
// server, so that opening more connections cannot beat the rate, as on a
// network link. A caller reserves n bytes and sleeps for the wait it is
// given before sending them; the bucket may go negative, so later callers
// queue behind earlier ones instead of all waking at once.
type pacer struct {
	mu     sync.Mutex
	rate   float64 // bytes per second
	burst  float64 // most bytes sent without waiting after an idle spell
	tokens float64
	last   time.Time
	now    func() time.Time
}

func newPacer(rate, burst int64, now func() time.Time) *pacer {
	return &pacer{rate: float64(rate), burst: float64(burst), tokens: float64(burst), last: now(), now: now}
}

// reserve takes n bytes from the bucket and says how long to wait before
// sending them.
func (p *pacer) reserve(n int) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	if el := now.Sub(p.last); el > 0 {
		p.tokens = min(p.burst, p.tokens+el.Seconds()*p.rate)
		p.last = now
	}
	p.tokens -= float64(n)
	if p.tokens >= 0 {
		return 0
	}
	// Round up: a wait a nanosecond short would let bytes out early.
	return time.Duration(-p.tokens/p.rate*float64(time.Second)) + 1
}

// pacePiece is the most bytes one reservation covers: a response body goes
// out in pieces no larger, so one big write cannot run ahead of the rate.
const pacePiece = 64 << 10

// pacedWriter writes a response body at the pacer's rate. It embeds only
// http.ResponseWriter's own methods: the server's ReadFrom (sendfile)
// would bypass the pacing.
type pacedWriter struct {
	http.ResponseWriter
	p *pacer
}

func (w pacedWriter) Write(b []byte) (int, error) {
	done := 0
	for done < len(b) {
		n := min(len(b)-done, pacePiece)
		if d := w.p.reserve(n); d > 0 {
			time.Sleep(d)
		}
		m, err := w.ResponseWriter.Write(b[done : done+n])
		done += m
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// paced serves h with every response body paced by p.
func paced(h http.Handler, p *pacer) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(pacedWriter{w, p}, r)
	})
}
