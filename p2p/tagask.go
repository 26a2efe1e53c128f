package p2p

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
)

// Resolve asks peers what r points to. Only listed registries are asked
// for; an answer nobody gives wraps blob.ErrNotFound.
func (t *Tags) Resolve(ctx context.Context, r TagRef) (TagTarget, error) {
	if !t.Listed(r.Registry) {
		t.m.resolves.WithLabelValues("refused").Inc()
		return TagTarget{}, fmt.Errorf("tag %s: registry %s is not in --registries: %w", r, r.Registry, blob.ErrNotFound)
	}
	fctx, cancel := context.WithTimeout(ctx, t.opts.FindTimeout)
	provs := t.find(fctx, TagCID(r))
	cancel()
	var self peer.ID
	if t.n != nil {
		self = t.n.self
	}
	var ps []peer.AddrInfo
	for _, p := range provs {
		if p.ID != self {
			ps = append(ps, p)
		}
	}
	if len(ps) == 0 {
		t.m.resolves.WithLabelValues("not_found").Inc()
		return TagTarget{}, fmt.Errorf("tag %s: no peer holds it: %w", r, blob.ErrNotFound)
	}
	best, from, err := t.askSome(ctx, r, ps)
	if err != nil {
		if errors.Is(err, blob.ErrNotFound) {
			t.m.resolves.WithLabelValues("not_found").Inc()
		} else {
			t.m.resolves.WithLabelValues("error").Inc()
		}
		return TagTarget{}, err
	}
	t.m.resolves.WithLabelValues("peer").Inc()
	t.lg.Info("tag resolved by a peer", "tag", r.String(), "digest", best.Digest, "peer", from.String(), "peer-updated", best.Updated)
	return best, nil
}

type tagAnswer struct {
	tt   TagTarget
	from peer.ID
	err  error
}

// askSome asks providers tagAskFanout at a time until one answers; once one
// has, the others of its round get tagAskGrace to offer a newer answer.
func (t *Tags) askSome(ctx context.Context, r TagRef, ps []peer.AddrInfo) (TagTarget, peer.ID, error) {
	var errs []error
	for len(ps) > 0 {
		round := ps[:min(tagAskFanout, len(ps))]
		ps = ps[len(round):]
		actx, cancel := context.WithTimeout(ctx, t.opts.AskTimeout)
		ch := make(chan tagAnswer, len(round))
		for _, p := range round {
			go func() {
				tt, err := t.ask(actx, p, r)
				if err == nil {
					if err = tt.check(); err != nil {
						err = fmt.Errorf("peer %s: bad answer for %s: %w", p.ID, r, err)
					}
				}
				ch <- tagAnswer{tt, p.ID, err}
			}()
		}
		var best *tagAnswer
		var grace <-chan time.Time
		for pending := len(round); pending > 0; {
			select {
			case a := <-ch:
				pending--
				if a.err != nil {
					errs = append(errs, a.err)
					continue
				}
				if best == nil || a.tt.Updated.After(best.tt.Updated) {
					best = &a
				}
				if grace == nil {
					tm := time.NewTimer(tagAskGrace)
					defer tm.Stop()
					grace = tm.C
				}
			case <-grace:
				pending = 0
			case <-actx.Done():
				pending = 0
			}
		}
		cancel() // the stragglers' answers go to the buffered channel
		if best != nil {
			return best.tt, best.from, nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	err := errors.Join(errs...)
	if err == nil {
		err = context.Cause(ctx)
	}
	if err == nil {
		err = errors.New("no answer")
	}
	for _, e := range errs {
		if !errors.Is(e, blob.ErrNotFound) {
			return TagTarget{}, "", fmt.Errorf("tag %s: peers did not answer: %w", r, err)
		}
	}
	return TagTarget{}, "", fmt.Errorf("tag %s: no provider holds it any more: %w", r, blob.ErrNotFound)
}

// findTagProviders looks the tag key up on the DHT until ctx ends, the
// query is over, or tagFindGrace passed since the first provider.
func (n *Node) findTagProviders(ctx context.Context, c cid.Cid) []peer.AddrInfo {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	return collectProviders(ctx, n.dht.FindProvidersAsync(ctx, c, 2*tagAskFanout), n.host.ID(), nil, tagFindGrace, 0)
}

// askTag asks one peer's data plane what a tag points to.
func (n *Node) askTag(ctx context.Context, ai peer.AddrInfo, r TagRef) (TagTarget, error) {
	pc, err := n.client.conn(ctx, ai)
	if err != nil {
		return TagTarget{}, fmt.Errorf("peer %s: %w", ai.ID, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+pc.addr+"/tags/"+r.String(), nil)
	if err != nil {
		return TagTarget{}, err
	}
	resp, err := pc.client.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			n.client.forget(ai.ID)
		}
		return TagTarget{}, fmt.Errorf("ask peer %s for tag %s: %w", ai.ID, r, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxTagAnswer+1))
	if err != nil {
		return TagTarget{}, fmt.Errorf("ask peer %s for tag %s: %w", ai.ID, r, err)
	}
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		return TagTarget{}, fmt.Errorf("peer %s does not hold tag %s: %w", ai.ID, r, blob.ErrNotFound)
	default:
		return TagTarget{}, fmt.Errorf("peer %s answered %s for tag %s", ai.ID, resp.Status, r)
	}
	if len(body) > maxTagAnswer {
		return TagTarget{}, fmt.Errorf("peer %s: tag answer over %d bytes", ai.ID, maxTagAnswer)
	}
	var tt TagTarget
	if err := json.Unmarshal(body, &tt); err != nil {
		return TagTarget{}, fmt.Errorf("peer %s: tag answer: %w", ai.ID, err)
	}
	return tt, nil
}
