package cache

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/peerd-project/peerd/blob"
)

// Swarm pulls: a blob read under a plan with an origin behind the peers
// (the OCI mirror's pull-through, the /blobs/ proxy, a FUSE read of a digest
// whose origin /blobs/ learned) is one many nodes may be pulling at the same
// moment. For such a pull:
//
//   - the blob is announced (on the DHT) when the handle opens,
//     not when its first chunk lands, so the other nodes pulling it learn at
//     once who else wants it;
//   - a peer source that is a blob.Swarm is asked with FetchShared: it may
//     decline a chunk it assigns to this node, which then comes from the
//     origin and is shared with the others;
//   - AwaitLocal lets the peer server wait for a chunk this node is fetching
//     from the origin instead of answering "don't have", and fetch one that
//     is assigned to this node and not yet started.

// peerStageWait bounds how long the owner of a chunk lets an asker wait
// while its own fill of the chunk is still asking peers (whether someone
// holds it). Two nodes that both believe they own the chunk (their provider
// lists disagree for a moment) may each be waiting for the other's answer:
// after this bound both answer "don't have" and both go to the origin. It
// must cover a normal peer stage, which asks every provider in turn: a bound
// shorter than that sends loaded bursts to the origin for chunks peers hold.
const peerStageWait = 2 * time.Second

// startPull registers a handle whose plan makes it a swarm pull and
// announces the blob. It reports whether the handle was counted.
func (e *entry) startPull(p Plan) bool {
	if !p.shared(e.key) {
		return false
	}
	e.mu.Lock()
	e.pulls++
	e.pullPlan = &p
	announce := !e.announced && !e.gone
	e.announced = e.announced || announce
	e.mu.Unlock()
	if announce {
		e.c.notify(e.key, true)
	}
	return true
}

func (e *entry) endPull() {
	e.mu.Lock()
	e.pulls--
	if e.pulls <= 0 {
		e.pulls, e.pullPlan = 0, nil // credentials in the origin source go with the last handle
	}
	e.mu.Unlock()
}

// AwaitLocal is OpenLocal for the peer server during a swarm pull. When the
// range is not yet servable and mine reports that this node owns its chunk
// (the rendezvous assigns it here), it waits, until ctx ends, for the chunk's
// fill in progress, or starts one with the pull's plan. That fill asks
// the other providers only whether they hold the chunk (for a bounded time,
// see p2p's FetchShared), then goes to the origin, so requests do not chain
// from node to node and a blob complete elsewhere is not fetched again. Chunks that come
// from peers stay unservable until the blob verified (the trust rule), so
// waiting helps only for chunks this node fetches from the origin. It waits
// at chunk granularity: a chunk is served once it has fully landed. Without
// a pull of k in progress it answers like OpenLocal, at once.
func (c *Cache) AwaitLocal(ctx context.Context, k blob.Key, off, n int64, mine func(off int64) bool) (*LocalReader, int64, error) {
	for {
		lr, size, err := c.OpenLocal(k, off, n)
		if err == nil || !errors.Is(err, blob.ErrNotFound) {
			return lr, size, err
		}
		c.mu.Lock()
		e, ok := c.blobs[k]
		if ok {
			e.refs++
		}
		c.mu.Unlock()
		if !ok {
			return nil, size, err
		}
		waitErr := c.awaitStep(ctx, e, off, n, mine)
		c.unref(e)
		if waitErr != nil {
			return nil, size, fmt.Errorf("%w (waited: %v)", err, waitErr)
		}
	}
}

// awaitStep waits for, or starts, the fill of the first chunk of the range
// that is not servable. It returns an error when nothing will make it so.
func (c *Cache) awaitStep(ctx context.Context, e *entry, off, n int64, mine func(int64) bool) error {
	cs := c.opts.ChunkSize
	e.mu.Lock()
	if e.size < 0 {
		// The first fill learns the size; it is waited for under the same
		// rules as any chunk's (it may be asking the very node that asks).
		call := e.inflight[0]
		e.mu.Unlock()
		if call == nil {
			return errors.New("no fill in progress")
		}
		return awaitFill(ctx, call, mine, off/cs*cs)
	}
	end := e.size
	if n >= 0 && off+n < end {
		end = off + n
	}
	if off < 0 || off >= end {
		e.mu.Unlock()
		return errors.New("range outside the blob")
	}
	i := -1
	for j := int(off / cs); int64(j)*cs < end; j++ {
		s := e.states[j]
		if s == stateAbsent || (s == stateUntrusted && !e.verified) {
			i = j
			break
		}
	}
	if i < 0 {
		e.mu.Unlock()
		return nil // servable now (it landed between the two looks)
	}
	if e.states[i] == stateUntrusted {
		e.mu.Unlock()
		return errors.New("chunk came from a peer; served only once the blob verified")
	}
	call, plan := e.inflight[i], e.pullPlan
	e.mu.Unlock()
	if call == nil && plan == nil {
		return errors.New("not being fetched here")
	}
	if call != nil {
		return awaitFill(ctx, call, mine, int64(i)*cs)
	}
	if mine == nil || !mine(int64(i)*cs) {
		return errors.New("not this node's chunk")
	}
	c.m.swarmFills.Inc()
	_, err := e.ensure(ctx, i, *plan, true)
	if err != nil {
		return err
	}
	if !e.hasChunk(i) {
		return errors.New("chunk could not be stored")
	}
	return nil
}

// awaitFill waits for a fill in progress of the chunk at off, under the
// rules that keep nodes from waiting for each other in a cycle.
func awaitFill(ctx context.Context, call *fillCall, mine func(int64) bool, off int64) error {
	// A fill already at the origin depends on no peer: anyone may wait for
	// it, owner or not (ownership may have moved since it started, when a
	// node joined the burst; answering "don't have" would make the asker
	// fetch the chunk a second time).
	if call.reachedOrigin() {
		return waitCall(ctx, call)
	}
	// Otherwise only the chunk's owner waits: a node that does not own it
	// answers at once (the asker's own fill may be what this one's fill is
	// asking about).
	if mine == nil || !mine(off) {
		return errors.New("not this node's chunk")
	}
	// The owner's fill is still asking peers: wait, briefly, for it to reach
	// the origin or finish; then the caller looks again.
	t := time.NewTimer(peerStageWait)
	defer t.Stop()
	select {
	case <-call.done:
		return call.err
	case <-call.atOrigin:
		return nil
	case <-t.C:
		return errors.New("this node's fill is still asking peers")
	case <-ctx.Done():
		return ctx.Err()
	}
}

func waitCall(ctx context.Context, call *fillCall) error {
	select {
	case <-call.done:
		return call.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// speculate fills chunk i of a swarm pull whose swarm answered with a
// Share still gathering: nobody was seen pulling the blob yet, but nodes that
// started at the same moment may still show up. The chunk comes from the
// origin at once, so a lone cold read waits for nobody; when the swarm can
// tell (gathering closed) that another node owns the chunk, that origin
// fetch is abandoned and the chunk is read through the swarm, so a burst of
// N nodes does not fetch every first chunk N times.
//
// Until the swarm decided, the fill does not count as "at the origin" for
// askers (awaitFill): only a fill that will not turn to a peer may be waited
// for by anyone, or two nodes could wait for each other.
func (e *entry) speculate(ctx context.Context, i int, p Plan, sw blob.Swarm, sh blob.Share, buf []byte, call, pub *fillCall) (int, step, string, error) {
	gathering := sh.Gathering
	if sh.Release != nil {
		// Once this returns, the chunk is here or fetched another way: the
		// swarm's second look is no longer needed for it.
		defer sh.Release()
	}
	octx, abandon := context.WithCancel(ctx)
	defer abandon()
	off := int64(i) * e.c.opts.ChunkSize
	yielded := false
	finished, decided := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(decided)
		select {
		case <-gathering:
		case <-finished:
			return
		}
		if sw.Yields(e.key, off) {
			yielded = true
			abandon()
			return
		}
		call.originOnce.Do(func() { close(call.atOrigin) })
	}()
	n, st, origin, err := e.fetch(octx, i, Plan{Origin: p.Origin}, buf, nil, pub)
	close(finished)
	<-decided
	if err == nil {
		return n, st, origin, nil
	}
	if !yielded {
		// The origin failed before the swarm could tell who pulls the blob
		// (a registry that is down refuses at once): wait for its answer
		// and ask the peers, or a pull with the registry down would fail
		// although a peer holds the chunk.
		select {
		case <-gathering:
		case <-ctx.Done():
			return n, st, origin, err
		}
		pn, pst, porigin, perr := e.fetch(ctx, i, Plan{Peers: p.Peers}, buf, nil, pub)
		if perr != nil {
			return 0, step{}, "", errors.Join(err, perr)
		}
		return pn, pst, porigin, nil
	}
	e.c.log.Debug("first chunk yielded to the node that owns it", "key", e.key, "chunk", i)
	// Through the swarm again, now with every node in view; the origin
	// stays behind it in case the owner fails.
	return e.fetch(ctx, i, Plan{Peers: p.Peers, Origin: p.Origin}, buf, call, pub)
}

// PullInfo describes a swarm pull in progress on this node.
type PullInfo struct {
	Key      blob.Key
	Handles  int // open handles whose plan makes the swarm pull
	Inflight int // chunk fills running
	Missing  int // chunks not yet present (-1 while the size is unknown)
}

// Pulls lists the swarm pulls in progress.
func (c *Cache) Pulls() []PullInfo {
	c.mu.Lock()
	es := make([]*entry, 0, 16)
	for _, e := range c.blobs {
		es = append(es, e)
	}
	c.mu.Unlock()
	var out []PullInfo
	for _, e := range es {
		e.mu.Lock()
		if e.pulls > 0 {
			missing := -1
			if e.size >= 0 {
				missing = len(e.states) - e.nPresent
			}
			out = append(out, PullInfo{Key: e.key, Handles: e.pulls, Inflight: len(e.inflight), Missing: missing})
		}
		e.mu.Unlock()
	}
	return out
}
