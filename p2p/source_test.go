package p2p

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func newPeerID(t testing.TB) peer.ID {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

type fakeFinder struct {
	calls atomic.Int32
	delay time.Duration
	mu    sync.Mutex
	peers []peer.AddrInfo
	block chan struct{} // when set, lookups wait for it
}

func (f *fakeFinder) FindProviders(ctx context.Context, k blob.Key, _ func([]peer.AddrInfo)) ([]peer.AddrInfo, error) {
	f.calls.Add(1)
	f.mu.Lock()
	block, peers := f.block, f.peers
	f.mu.Unlock()
	if block != nil {
		<-block
	}
	if f.delay > 0 {
		select {
		case <-time.After(f.delay):
		case <-ctx.Done():
		}
	}
	return peers, nil
}

type call struct {
	p      peer.ID
	off, n int64
	insist bool // the request insisted (waited its turn for others)
}

// fakeGetter serves ranges of data per peer according to a behaviour.
type fakeGetter struct {
	data []byte
	mu   sync.Mutex
	log  []call
	// behave decides per peer: "ok", "err", "notfound", "slow", "break"
	// (half then error), "past-end" (416 for an offset at or past the end),
	// "busy" (at its upload bound), "fanout" and "zone" (busy for others'
	// sake unless the request insists), "whole" (served from a whole copy),
	// "trickle" (one byte per read).
	behave map[peer.ID]string
	// cancelled records attempts whose context ended.
	cancelled atomic.Int32
	// hold, when set, holds "whole" answers until it is closed.
	hold chan struct{}
}

// crawlReader hands out one byte per read: a peer whose link crawls.
type crawlReader struct{ b []byte }

func (r *crawlReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	p[0] = r.b[0]
	r.b = r.b[1:]
	return 1, nil
}

// wholeReader is a holder's answer from a whole copy (wholeHeader).
type wholeReader struct{ *bytes.Reader }

func (wholeReader) Close() error    { return nil }
func (wholeReader) fromWhole() bool { return true }

func (g *fakeGetter) GetRange(ctx context.Context, ai peer.AddrInfo, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	g.mu.Lock()
	g.log = append(g.log, call{ai.ID, off, n, insisting(ctx)})
	b := g.behave[ai.ID]
	g.mu.Unlock()
	size := int64(len(g.data))
	end := min(off+n, size)
	switch b {
	case "err":
		return nil, -1, errors.New("connection refused")
	case "busy":
		return nil, -1, &BusyError{Peer: ai.ID, RetryAfter: time.Second}
	case "fanout", "zone":
		if !insisting(ctx) {
			return nil, -1, &BusyError{Peer: ai.ID, Reason: b, RetryAfter: fanoutRetry}
		}
	case "fanout-forever":
		return nil, -1, &BusyError{Peer: ai.ID, Reason: "fanout", RetryAfter: fanoutRetry}
	case "trickle":
		return io.NopCloser(&crawlReader{b: g.data[off:end]}), size, nil
	case "whole":
		if g.hold != nil {
			<-g.hold
		}
		return wholeReader{bytes.NewReader(g.data[off:end])}, size, nil
	case "notfound":
		return nil, -1, fmt.Errorf("not held: %w", blob.ErrNotFound)
	case "past-end":
		if off >= size {
			return nil, -1, fmt.Errorf("peer %s: %w", ai.ID, ErrRangeNotSatisfiable)
		}
	case "slow":
		select {
		case <-ctx.Done():
			g.cancelled.Add(1)
			return nil, -1, ctx.Err()
		case <-time.After(10 * time.Second):
		}
	case "hang":
		// Half the range, then a body that waits like an HTTP body does: it
		// fails only when the request's context ends.
		half := off + (end-off)/2
		return io.NopCloser(io.MultiReader(bytes.NewReader(g.data[off:half]), ctxReader{ctx})), size, nil
	case "break":
		half := off + (end-off)/2
		return io.NopCloser(io.MultiReader(bytes.NewReader(g.data[off:half]), errReader{})), size, nil
	}
	return io.NopCloser(bytes.NewReader(g.data[off:end])), size, nil
}

func (g *fakeGetter) calls() []call {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]call(nil), g.log...)
}

// ctxReader blocks until ctx ends and then fails with its error.
type ctxReader struct{ ctx context.Context }

func (r ctxReader) Read([]byte) (int, error) {
	<-r.ctx.Done()
	return 0, r.ctx.Err()
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("connection reset by peer") }

func testKey() blob.Key {
	return blob.Key("sha256:" + fmt.Sprintf("%064x", 42))
}

func setup(t *testing.T, behaviours ...string) (*Source, *fakeFinder, *fakeGetter, []peer.ID) {
	t.Helper()
	data := make([]byte, 3<<20)
	rand.Read(data)
	g := &fakeGetter{data: data, behave: map[peer.ID]string{}}
	f := &fakeFinder{}
	var ids []peer.ID
	for _, b := range behaviours {
		id := newPeerID(t)
		ids = append(ids, id)
		g.behave[id] = b
		f.peers = append(f.peers, peer.AddrInfo{ID: id})
	}
	s := newSource(newPeerID(t), f, g, nil, nil, 20*time.Millisecond, 1)
	// These tests say which provider is asked first: the DHT's order.
	// Spreading over holders is tested on its own (TestSpread...).
	s.noSpread = true
	return s, f, g, ids
}

func readAll(t *testing.T, s *Source, off, n int64) ([]byte, string, error) {
	t.Helper()
	rc, _, err := s.Fetch(context.Background(), testKey(), off, n)
	if err != nil {
		return nil, "", err
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	return b, rc.(blob.Attributed).Origin(), err
}

func TestSourceReadsFromFirstProvider(t *testing.T) {
	s, _, g, ids := setup(t, "ok", "ok")
	b, origin, err := readAll(t, s, 1<<20, 1<<20)
	if err != nil || !bytes.Equal(b, g.data[1<<20:2<<20]) {
		t.Fatalf("got %d bytes, %v", len(b), err)
	}
	if origin != ids[0].String() {
		t.Fatalf("origin %s, want first provider %s", origin, ids[0])
	}
	if c := g.calls(); len(c) != 1 {
		t.Fatalf("%d requests, want 1", len(c))
	}
}

func TestSourceSizeAndEndOfBlob(t *testing.T) {
	s, _, g, _ := setup(t, "ok")
	rc, size, err := s.Fetch(context.Background(), testKey(), 3<<20-10, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || size != int64(len(g.data)) || !bytes.Equal(b, g.data[3<<20-10:]) {
		t.Fatalf("size %d, %d bytes, %v", size, len(b), err)
	}
}

func TestSourceNegativeResultIsCachedPerBlob(t *testing.T) {
	s, f, g, _ := setup(t)
	for i := 0; i < 50; i++ {
		if _, _, err := readAll(t, s, int64(i)<<20, 1<<20); !errors.Is(err, blob.ErrNotFound) {
			t.Fatalf("chunk %d: %v, want ErrNotFound", i, err)
		}
	}
	// One lookup for the whole blob, not per chunk; a query that ran to
	// completion and found nobody is not retried.
	if n := f.calls.Load(); n != 1 {
		t.Fatalf("%d lookups for 50 chunks of a blob nobody has, want 1", n)
	}
	if len(g.calls()) != 0 {
		t.Fatal("asked a peer though none was found")
	}
}

func TestSourceLookupThatRanOutOfTimeIsNotStartedOver(t *testing.T) {
	// On a synctest clock the 50 ms finder always outlasts the 20 ms bound,
	// however loaded the machine (on the wall clock a slow scheduler could
	// make either side win).
	synctest.Test(t, func(t *testing.T) {
		s, f, _, _ := setup(t)
		f.delay = 50 * time.Millisecond // longer than the 20ms resolve timeout
		if _, _, err := readAll(t, s, 0, 1<<20); !errors.Is(err, blob.ErrNotFound) {
			t.Fatalf("%v, want ErrNotFound", err)
		}
		// The reader stopped waiting at 20 ms; the query runs on to its end
		// instead of a second one walking the DHT again.
		time.Sleep(time.Minute) // on the bubble's clock: every query has ended
		if n := f.calls.Load(); n != 1 {
			t.Fatalf("%d lookups, want 1 (a slow query runs on, it is not started over)", n)
		}
	})
}

// errFinder fails every query at once, like a DHT with nobody to ask.
type errFinder struct{ calls atomic.Int32 }

func (f *errFinder) FindProviders(ctx context.Context, k blob.Key, _ func([]peer.AddrInfo)) ([]peer.AddrInfo, error) {
	f.calls.Add(1)
	return nil, errors.New("no peers in the routing table")
}

func TestSourceRetriesALookupThatFailed(t *testing.T) {
	f := &errFinder{}
	s := newSource(newPeerID(t), f, &fakeGetter{}, nil, nil, 20*time.Millisecond, 2)
	if ps := s.Providers(context.Background(), testKey()); len(ps) != 0 {
		t.Fatalf("providers %v from a failing DHT", ps)
	}
	if n := f.calls.Load(); n != 3 {
		t.Fatalf("%d lookups, want 3 (one and --resolve-retries 2)", n)
	}
}

func TestSourceConcurrentCallersShareOneLookup(t *testing.T) {
	s, f, _, _ := setup(t, "ok")
	f.delay = 5 * time.Millisecond
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, _, err := readAll(t, s, 0, 1000); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := f.calls.Load(); n != 1 {
		t.Fatalf("%d lookups, want 1", n)
	}
}

func TestSourceSkipsSelf(t *testing.T) {
	s, f, g, ids := setup(t, "ok")
	f.peers = append([]peer.AddrInfo{{ID: s.self}}, f.peers...)
	if _, origin, err := readAll(t, s, 0, 100); err != nil || origin != ids[0].String() {
		t.Fatalf("origin %s, %v", origin, err)
	}
	for _, c := range g.calls() {
		if c.p == s.self {
			t.Fatal("asked itself")
		}
	}
}

func TestSourceFailsOverAndRemembersFailures(t *testing.T) {
	s, _, g, ids := setup(t, "err", "notfound", "ok")
	b, origin, err := readAll(t, s, 0, 1<<20)
	if err != nil || !bytes.Equal(b, g.data[:1<<20]) {
		t.Fatalf("%d bytes, %v", len(b), err)
	}
	if origin != ids[2].String() {
		t.Fatalf("origin %s, want %s", origin, ids[2])
	}
	// The failing peer is left out for a while; "don't have" is no failure.
	got := s.order([]peer.AddrInfo{{ID: ids[0]}, {ID: ids[1]}, {ID: ids[2]}})
	if len(got) != 2 || got[0].ID != ids[1] || got[1].ID != ids[2] {
		t.Fatalf("order after failure: %v", got)
	}
	before := len(g.calls())
	if _, _, err := readAll(t, s, 0, 10); err != nil {
		t.Fatal(err)
	}
	for _, c := range g.calls()[before:] {
		if c.p == ids[0] {
			t.Fatal("asked the failing peer again at once")
		}
	}
	// After the penalty it is asked again, and a success clears it.
	s.now = func() time.Time { return time.Now().Add(errorAvoid + time.Second) }
	if got := s.order([]peer.AddrInfo{{ID: ids[0]}}); len(got) != 1 {
		t.Fatal("penalty never ends")
	}
}

// A reader whose caller gives up (a hedge lost, a pod deleted) fails its
// read, but the peer did nothing wrong: no peer error, no penalty.
func TestSourceCallerGivingUpIsNoPeerFailure(t *testing.T) {
	s, _, _, ids := setup(t, "hang", "ok")
	ctx, cancel := context.WithCancel(context.Background())
	rc, _, err := s.Fetch(ctx, testKey(), 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if _, err := io.ReadFull(rc, make([]byte, 1<<19)); err != nil {
		t.Fatalf("first half: %v", err)
	}
	time.AfterFunc(50*time.Millisecond, cancel)
	if _, err := rc.Read(make([]byte, 1024)); !errors.Is(err, context.Canceled) {
		t.Fatalf("read after the caller gave up: %v, want context.Canceled", err)
	}
	if n := testutil.CollectAndCount(s.m.peerErrors); n != 0 {
		t.Fatalf("%d peer error series after the caller gave up, want none", n)
	}
	if got := s.order([]peer.AddrInfo{{ID: ids[0]}, {ID: ids[1]}}); len(got) != 2 {
		t.Fatalf("order after the caller gave up: %v; the holder it was reading from is avoided", got)
	}
}

func TestSourceAllProvidersLackIt(t *testing.T) {
	s, _, _, _ := setup(t, "notfound", "notfound")
	if _, _, err := readAll(t, s, 0, 10); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("%v, want ErrNotFound", err)
	}
	s2, _, _, _ := setup(t, "err", "notfound")
	if _, _, err := readAll(t, s2, 0, 10); err == nil || errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("%v, want a peer error (not ErrNotFound)", err)
	}
}

func TestSourceHedgesASlowProvider(t *testing.T) {
	s, _, g, ids := setup(t, "slow", "ok")
	start := time.Now()
	b, origin, err := readAll(t, s, 0, 1<<20)
	if err != nil || !bytes.Equal(b, g.data[:1<<20]) {
		t.Fatalf("%d bytes, %v", len(b), err)
	}
	if origin != ids[1].String() {
		t.Fatalf("origin %s, want the hedge %s", origin, ids[1])
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("waited for the slow provider instead of hedging")
	}
	// The slow attempt is cancelled, not left running.
	waitFor(t, "slow attempt cancelled", func() bool { return g.cancelled.Load() == 1 })
}

func TestSourceHedgeDelayAdapts(t *testing.T) {
	var l latencies
	if d := l.hedgeDelay(); d != initialHedge {
		t.Fatalf("initial delay %v", d)
	}
	for i := 0; i < 100; i++ {
		l.add(time.Millisecond)
	}
	if d := l.hedgeDelay(); d != minHedge {
		t.Fatalf("fast peers: delay %v, want the floor %v", d, minHedge)
	}
	for i := 0; i < 128; i++ {
		l.add(100 * time.Millisecond)
	}
	if d := l.hedgeDelay(); d != 200*time.Millisecond {
		t.Fatalf("slow peers: delay %v, want 200ms", d)
	}
}

func TestSourceResumesABrokenTransfer(t *testing.T) {
	s, _, g, ids := setup(t, "break", "ok")
	b, origin, err := readAll(t, s, 1<<20, 1<<20)
	if err != nil || !bytes.Equal(b, g.data[1<<20:2<<20]) {
		t.Fatalf("%d bytes, %v", len(b), err)
	}
	if origin != ids[0].String()+","+ids[1].String() {
		t.Fatalf("origin %q, want both peers", origin)
	}
	c := g.calls()
	last := c[len(c)-1]
	if last.p != ids[1] || last.off != 1<<20+1<<19 || last.n != 1<<19 {
		t.Fatalf("resume asked %+v, want the second half from the second peer", last)
	}
}

func TestSourceBrokenTransferWithNoOneLeft(t *testing.T) {
	s, _, _, _ := setup(t, "break")
	if _, _, err := readAll(t, s, 0, 1<<20); err == nil {
		t.Fatal("a broken transfer with no other provider read without error")
	}
}

func TestSourceAvoidsBlamedPeers(t *testing.T) {
	s, _, g, ids := setup(t, "ok", "ok")
	s.Blame(testKey(), ids[0].String()+","+ids[1].String()[:5])
	_, origin, err := readAll(t, s, 0, 10)
	if err != nil || origin != ids[1].String() {
		t.Fatalf("origin %s, %v", origin, err)
	}
	for _, c := range g.calls() {
		if c.p == ids[0] {
			t.Fatal("asked a blamed peer")
		}
	}
}

func TestSourceRefusesURLKeys(t *testing.T) {
	s, f, _, _ := setup(t, "ok")
	_, _, err := s.Fetch(context.Background(), blob.Key("url:"+fmt.Sprintf("%064x", 1)), 0, 10)
	if !errors.Is(err, blob.ErrNotFound) || f.calls.Load() != 0 {
		t.Fatalf("%v, %d lookups", err, f.calls.Load())
	}
}

func TestSourceDeadProviderCostsOnce(t *testing.T) {
	s, _, g, _ := setup(t, "err")
	if _, _, err := readAll(t, s, 0, 10); err == nil || errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("first read: %v, want the peer's error", err)
	}
	for i := 1; i < 20; i++ {
		if _, _, err := readAll(t, s, int64(i)<<20, 10); !errors.Is(err, blob.ErrNotFound) {
			t.Fatalf("chunk %d: %v, want a quick ErrNotFound", i, err)
		}
	}
	if n := len(g.calls()); n != 1 {
		t.Fatalf("asked the dead provider %d times, want once", n)
	}
}

func TestSourceRefreshesExpiredAnswersInTheBackground(t *testing.T) {
	s, f, _, ids := setup(t, "ok")
	var nowMu sync.Mutex
	now := time.Now()
	s.now = func() time.Time { nowMu.Lock(); defer nowMu.Unlock(); return now }
	advance := func(d time.Duration) { nowMu.Lock(); now = now.Add(d); nowMu.Unlock() }
	all := f.peers
	f.mu.Lock()
	f.peers = nil
	f.mu.Unlock()
	if _, _, err := readAll(t, s, 0, 10); !errors.Is(err, blob.ErrNotFound) {
		t.Fatal(err)
	}
	base := f.calls.Load()

	// The answer expired; the provider appeared, but the DHT is slow: the
	// caller gets the old answer at once and the refresh runs behind it.
	f.mu.Lock()
	f.peers = all
	f.block = make(chan struct{})
	block := f.block
	f.mu.Unlock()
	advance(negativeTTL + time.Second)
	if _, _, err := readAll(t, s, 1<<20, 10); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("stale answer: %v", err)
	}
	waitFor(t, "background lookup", func() bool { return f.calls.Load() > base })
	close(block)
	waitFor(t, "refreshed", func() bool {
		_, origin, err := readAll(t, s, 2<<20, 10)
		return err == nil && origin == ids[0].String()
	})
}

// A refresh that ran out of time (a busy node, a slow DHT) keeps the known
// holders: "nobody" from a lookup that never finished must not send the
// blob's chunks to the origin until the negative answer expires.
func TestSourceSlowRefreshKeepsTheHolders(t *testing.T) {
	s, f, _, ids := setup(t, "ok")
	var nowMu sync.Mutex
	now := time.Now()
	s.now = func() time.Time { nowMu.Lock(); defer nowMu.Unlock(); return now }
	if _, origin, err := readAll(t, s, 0, 10); err != nil || origin != ids[0].String() {
		t.Fatalf("first read: %v from %q", err, origin)
	}
	f.mu.Lock()
	f.peers = nil
	f.mu.Unlock()
	f.delay = time.Hour // every try ends at its deadline: late
	nowMu.Lock()
	now = now.Add(positiveTTL + time.Second)
	nowMu.Unlock()
	base := f.calls.Load()
	if _, _, err := readAll(t, s, 1<<20, 10); err != nil {
		t.Fatalf("stale answer: %v", err)
	}
	waitFor(t, "the refresh to end", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		e := s.provs[testKey()]
		return f.calls.Load() > base && e != nil && !e.refreshing
	})
	if _, origin, err := readAll(t, s, 2<<20, 10); err != nil || origin != ids[0].String() {
		t.Fatalf("after a slow refresh: %v from %q, want the holder", err, origin)
	}
}

// streamFinder reports its first provider, then holds the query open until
// released, like a DHT query still walking the network.
type streamFinder struct {
	peers   []peer.AddrInfo
	release chan struct{}
}

func (f *streamFinder) FindProviders(ctx context.Context, k blob.Key, first func([]peer.AddrInfo)) ([]peer.AddrInfo, error) {
	if first != nil {
		first(f.peers[:1])
	}
	select {
	case <-f.release:
	case <-ctx.Done():
	}
	return f.peers, nil
}

func TestFirstLookupAnswersAtTheFirstProviderAndKeepsCollecting(t *testing.T) {
	f := &streamFinder{release: make(chan struct{})}
	for range 3 {
		f.peers = append(f.peers, peer.AddrInfo{ID: newPeerID(t)})
	}
	s := newSource(newPeerID(t), f, &fakeGetter{}, nil, nil, time.Minute, 0)
	k := testKey()
	// The query is still running (released below): the caller has its first
	// provider anyway.
	if ps := s.providers(context.Background(), k); len(ps) != 1 || ps[0].ID != f.peers[0].ID {
		t.Fatalf("first answer %v, want the first provider alone", ps)
	}
	close(f.release)
	// The rest of the query lands in the cached list for failover.
	deadline := time.Now().Add(10 * time.Second)
	for len(s.providers(context.Background(), k)) != 3 {
		if time.Now().After(deadline) {
			t.Fatalf("cached list %v, want all 3 providers", s.providers(context.Background(), k))
		}
		time.Sleep(time.Millisecond)
	}
}

// A lookup keeps the providers that arrive back to back with its first (one
// DHT answer carries all its peer knows) and stops at the first pause
// instead of running the query on for later answers.
func TestCollectProvidersStopsAtTheFirstPause(t *testing.T) {
	// In a synctest bubble the clock moves only when every goroutine of the
	// test is blocked, so the 300 ms pause is the test's own, never a
	// scheduling delay between two sends on a loaded machine (which would
	// end the collection early and leave the next send blocked forever).
	synctest.Test(t, func(t *testing.T) {
		ch := make(chan peer.AddrInfo)
		var ids []peer.ID
		for range 4 {
			ids = append(ids, newPeerID(t))
		}
		var firstSeen []peer.AddrInfo
		done := make(chan []peer.AddrInfo, 1)
		go func() {
			done <- collectProviders(context.Background(), ch, "", func(ps []peer.AddrInfo) { firstSeen = slices.Clone(ps) }, time.Hour, 300*time.Millisecond)
		}()
		for _, id := range ids[:3] {
			select {
			case ch <- peer.AddrInfo{ID: id}:
			case got := <-done:
				t.Fatalf("the lookup returned %v before the pause", got)
			}
		}
		// The pause: nobody sends the fourth. On the bubble's clock the
		// lookup ends exactly one gap after the last provider, not at the
		// hour of grace.
		last := time.Now()
		got := <-done
		if waited := time.Since(last); waited != 300*time.Millisecond {
			t.Fatalf("the lookup ended %v after the last provider, want at the 300 ms pause", waited)
		}
		if len(got) != 3 || got[0].ID != ids[0] || got[2].ID != ids[2] {
			t.Fatalf("collected %v, want the three sent back to back", got)
		}
		if len(firstSeen) != 1 || firstSeen[0].ID != ids[0] {
			t.Fatalf("first called with %v, want only the first provider", firstSeen)
		}
		select {
		case ch <- peer.AddrInfo{ID: ids[3]}:
			t.Fatal("a provider was read after the lookup returned")
		default:
		}
	})
}

// Providers that keep trickling in do not hold a lookup past its grace.
func TestCollectProvidersGraceBoundsATrickle(t *testing.T) {
	ch := make(chan peer.AddrInfo)
	stop := make(chan struct{})
	defer close(stop)
	id := newPeerID(t)
	go func() {
		for {
			select {
			case ch <- peer.AddrInfo{ID: id}:
			case <-stop:
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	done := make(chan []peer.AddrInfo, 1)
	go func() { done <- collectProviders(context.Background(), ch, "", nil, 50*time.Millisecond, time.Hour) }()
	select {
	case got := <-done:
		if len(got) == 0 {
			t.Fatal("no provider collected")
		}
	case <-time.After(time.Minute):
		t.Fatal("the lookup never stopped collecting")
	}
}

// A closed channel (the query ended) or a cancelled context ends the
// collection with what it has, with or without a provider.
func TestCollectProvidersEndsWithTheQuery(t *testing.T) {
	ch := make(chan peer.AddrInfo, 1)
	id := newPeerID(t)
	ch <- peer.AddrInfo{ID: id}
	close(ch)
	if got := collectProviders(context.Background(), ch, "", nil, time.Hour, time.Hour); len(got) != 1 || got[0].ID != id {
		t.Fatalf("closed query: got %v", got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if got := collectProviders(ctx, make(chan peer.AddrInfo), "", nil, time.Hour, time.Hour); len(got) != 0 {
		t.Fatalf("cancelled query: got %v", got)
	}
}

// slowFinder answers after delay; a lookup whose deadline comes first
// gets nothing, as from a DHT query cut short.
type slowFinder struct {
	calls atomic.Int32
	delay time.Duration
	peers []peer.AddrInfo
}

func (f *slowFinder) FindProviders(ctx context.Context, k blob.Key, _ func([]peer.AddrInfo)) ([]peer.AddrInfo, error) {
	f.calls.Add(1)
	select {
	case <-time.After(f.delay):
		return f.peers, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// A lookup that found nobody because it ran out of time runs on in the
// background, and its providers are what the next reader gets, instead of
// "nobody" for the negative TTL. A lookup that ended with no provider is an
// answer and nothing follows it.
func TestSourceLookupThatRanOutOfTimeAnswersTheNextReader(t *testing.T) {
	// In a synctest bubble the finders' delays and the 20 ms bound are read
	// on the bubble's clock, which moves only when every goroutine waits: a
	// 1 ms finder always beats the 20 ms bound, however loaded the machine.
	synctest.Test(t, func(t *testing.T) {
		p := peer.AddrInfo{ID: newPeerID(t)}
		// Slower than the 20 ms bound, well inside the bound of a query that
		// runs on.
		f := &slowFinder{delay: 100 * time.Millisecond, peers: []peer.AddrInfo{p}}
		s := newSource(newPeerID(t), f, &fakeGetter{}, nil, nil, 20*time.Millisecond, 1)
		k := testKey()
		if ps := s.Providers(context.Background(), k); len(ps) != 0 {
			t.Fatalf("first lookup found %v before its deadline", ps)
		}
		// Only the query that ran on can find p before the negative TTL ends.
		deadline := time.Now().Add(negativeTTL - time.Second)
		for {
			ps := s.Providers(context.Background(), k)
			if len(ps) == 1 && ps[0].ID == p.ID {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("providers %v before the negative answer expired; want the slow query's %s", ps, p.ID)
			}
			time.Sleep(10 * time.Millisecond)
		}
		if got := testutil.ToFloat64(s.m.lookupCache.WithLabelValues("late")); got != 1 {
			t.Errorf("late lookups counted: %v, want 1", got)
		}
		if got := f.calls.Load(); got != 1 {
			t.Errorf("finder calls: %d, want 1 (one query, run on past its caller's bound)", got)
		}

		// A query that ran to its end and found nobody is not followed.
		done := &slowFinder{delay: time.Millisecond}
		s2 := newSource(newPeerID(t), done, &fakeGetter{}, nil, nil, 20*time.Millisecond, 1)
		if ps := s2.Providers(context.Background(), k); len(ps) != 0 {
			t.Fatalf("providers %v from a finder that has none", ps)
		}
		time.Sleep(time.Second) // on the bubble's clock: a late lookup, had one started, has ended
		if got := done.calls.Load(); got != 1 {
			t.Errorf("finder calls after an answer of nobody: %d, want 1", got)
		}
		if got := testutil.ToFloat64(s2.m.lookupCache.WithLabelValues("late")); got != 0 {
			t.Errorf("late lookups counted after an answer of nobody: %v", got)
		}
	})
}

// TestSourceBlameAvoidsThePeerForItsWindow checks the blame's promise: a
// peer whose bytes failed verification is not asked again for blameAvoid
// (not even after a good answer from another peer, nor after the provider
// list is looked up again), and is asked once the window is over.
func TestSourceBlameAvoidsThePeerForItsWindow(t *testing.T) {
	s, _, g, ids := setup(t, "ok", "ok")
	var nowMu sync.Mutex
	now := time.Now()
	s.now = func() time.Time { nowMu.Lock(); defer nowMu.Unlock(); return now }
	advance := func(d time.Duration) { nowMu.Lock(); now = now.Add(d); nowMu.Unlock() }

	s.Blame(testKey(), ids[0].String())
	var waited time.Duration
	for i, step := range []time.Duration{0, time.Minute, 4 * time.Minute, blameAvoid - 5*time.Minute - time.Second} {
		advance(step)
		waited += step
		before := len(g.calls())
		off := i << 18
		b, origin, err := readAll(t, s, int64(off), 10)
		if err != nil || origin != ids[1].String() || !bytes.Equal(b, g.data[off:off+10]) {
			t.Fatalf("%v after the blame: origin %s, err %v", waited, origin, err)
		}
		for _, c := range g.calls()[before:] {
			if c.p == ids[0] {
				t.Fatalf("asked the blamed peer %v after the blame, within its %v window", waited, blameAvoid)
			}
		}
	}
	// The window ends: the peer is asked again (it is first in the DHT's order).
	advance(2 * time.Second)
	waited += 2 * time.Second
	before := len(g.calls())
	if _, origin, err := readAll(t, s, 2<<20, 10); err != nil || origin != ids[0].String() {
		t.Fatalf("%v after the blame (window %v): origin %s, err %v; want the once-blamed peer", waited, blameAvoid, origin, err)
	}
	asked := false
	for _, c := range g.calls()[before:] {
		asked = asked || c.p == ids[0]
	}
	if !asked {
		t.Fatalf("the blamed peer was not asked %v after the blame", waited)
	}
}
