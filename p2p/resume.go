package p2p

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
)

const (
	// A body that makes no progress this long is abandoned for the next provider.
	stallTimeout = 5 * time.Second
	// A body slower than minPeerRate over its first slowCheck (and after)
	// is abandoned too, without penalty: a peer with a congested link, or
	// a fair share of a rate cap that small, is not worth waiting for while
	// other holders have the bytes.
	slowCheck   = 2 * time.Second
	minPeerRate = 256 << 10 // bytes per second
)

// peerReader delivers one range, resuming from the next provider at the byte
// it stopped when a transfer breaks or stalls.
type peerReader struct {
	s                *Source
	ctx              context.Context
	k                blob.Key
	off, want, total int64
	pos              int64
	cur              *attempt
	rest             []peer.AddrInfo
	// held: holders that sent the fetch to wait for other askers; a resume
	// with nobody left in rest asks them again, insisting.
	held     []peer.AddrInfo
	curStart time.Time // when cur started delivering
	curBytes int64     // bytes cur delivered
	origins  []string
	closed   bool
}

// Origin names the peers the bytes came from (blob.Attributed).
// A peer read names the peers it read from, so a failed verification blames them.
var _ blob.Attributed = (*peerReader)(nil)

func (r *peerReader) Origin() string { return strings.Join(r.origins, ",") }

func (r *peerReader) Read(p []byte) (int, error) {
	for {
		if r.pos >= r.want {
			return 0, io.EOF
		}
		if r.cur == nil {
			return 0, errors.New("peer reader closed")
		}
		if int64(len(p)) > r.want-r.pos {
			p = p[:r.want-r.pos]
		}
		if r.curStart.IsZero() {
			r.curStart = r.s.now()
		}
		stall := time.AfterFunc(stallTimeout, r.cur.cancel)
		m, err := r.cur.rc.Read(p)
		stalled := !stall.Stop()
		r.pos += int64(m)
		r.curBytes += int64(m)
		if err == io.EOF && r.pos >= r.want {
			return m, io.EOF
		}
		if err == nil {
			if el := r.s.now().Sub(r.curStart); el >= slowCheck && float64(r.curBytes) < minPeerRate*el.Seconds() && r.pos < r.want && len(r.rest)+len(r.held) > 0 {
				r.s.m.peerErrors.WithLabelValues("slow").Inc()
				if rerr := r.switchFrom(fmt.Errorf("%d bytes in %v: slower than %d KiB/s", r.curBytes, el.Round(time.Millisecond), minPeerRate>>10), false); rerr != nil {
					return m, rerr
				}
			}
			return m, nil
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		if r.ctx.Err() != nil {
			// The caller gave up (a hedge lost, a pull cancelled): the body
			// failed for that, not for anything the peer did.
			return m, r.switchFrom(err, false)
		}
		if stalled {
			err = fmt.Errorf("no progress for %v: %w", stallTimeout, err)
			r.s.m.peerErrors.WithLabelValues("timeout").Inc()
		} else {
			r.s.m.peerErrors.WithLabelValues("read").Inc()
		}
		if rerr := r.resume(err); rerr != nil {
			return m, rerr
		}
		if m > 0 {
			return m, nil
		}
	}
}

// resume switches to the next provider for the bytes not yet delivered,
// blaming the one that broke.
func (r *peerReader) resume(cause error) error { return r.switchFrom(cause, true) }

// switchFrom abandons the current provider (penalized when it failed, not
// when it was only slow) for the next one: the providers not asked yet,
// then those that sent the fetch to wait for others, insisting.
func (r *peerReader) switchFrom(cause error, penalize bool) error {
	failed := r.cur
	failed.rc.Close()
	failed.cancel()
	r.cur = nil
	r.curStart, r.curBytes = time.Time{}, 0
	if r.ctx.Err() != nil {
		return r.ctx.Err()
	}
	if penalize {
		r.s.penalize(failed.p.ID, cause)
	}
	r.s.log.Info("peer transfer broke; resuming from the next provider", "key", r.k, "peer", failed.p.ID.String(),
		"at", r.off+r.pos, "err", cause)
	errs := []error{fmt.Errorf("peer %s: %w", failed.p.ID, cause)}
	if !penalize {
		// Only slow: the fetch has waited long enough to insist anywhere,
		// and the slow provider stays the last resort (its bytes flow).
		r.rest = append(addMissing(r.rest, r.held), failed.p)
		r.held = nil
		r.ctx = insist(r.ctx)
	}
	for len(r.rest) > 0 || len(r.held) > 0 {
		if len(r.rest) == 0 {
			r.rest, r.held = r.held, nil
			r.ctx = insist(r.ctx)
		}
		p := r.rest[0]
		r.rest = r.rest[1:]
		if p.ID == failed.p.ID && (penalize || len(r.rest) > 0) {
			continue // broken; or slow, and not yet the last resort
		}
		actx, cancel := context.WithCancel(r.ctx)
		rc, total, err := r.s.getter.GetRange(actx, p, r.k, r.off+r.pos, r.want-r.pos)
		if err == nil && total != r.total {
			rc.Close()
			err = fmt.Errorf("size %d, expected %d", total, r.total)
			r.s.m.peerErrors.WithLabelValues("size").Inc()
		}
		if err != nil {
			cancel()
			errs = append(errs, fmt.Errorf("peer %s: %w", p.ID, err))
			if !errors.Is(err, blob.ErrNotFound) && !errors.Is(err, errBusy) && r.ctx.Err() == nil {
				r.s.penalize(p.ID, err)
			}
			continue
		}
		r.s.m.resumes.Inc()
		r.cur = &attempt{p: p, rc: rc, total: total, cancel: cancel}
		if !slices.Contains(r.origins, p.ID.String()) {
			r.origins = append(r.origins, p.ID.String())
		}
		return nil
	}
	return fmt.Errorf("%s at byte %d: %w", r.k, r.off+r.pos, errors.Join(errs...))
}

func (r *peerReader) Close() error {
	if r.closed {
		return nil
	}
	r.closed = true
	if r.cur != nil {
		r.cur.rc.Close()
		r.cur.cancel()
		r.cur = nil
	}
	return nil
}
