package p2p

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestUploadsShareSlotsFairlyBetweenAskers(t *testing.T) {
	u := newUploads(4, 0, nil)
	a, b, c := newPeerID(t), newPeerID(t), newPeerID(t)
	// Alone, an asker may take every slot.
	for i := range 4 {
		if !u.admit(a) {
			t.Fatalf("a's transfer %d refused with free slots", i)
		}
	}
	if u.admit(a) || u.admit(b) {
		t.Fatal("admitted past the stream bound")
	}
	// a drops to 2: b's share with two askers is 2, a is at its share.
	u.release(a)
	u.release(a)
	if !u.admit(b) || !u.admit(b) {
		t.Fatal("b refused its share")
	}
	if u.admit(a) {
		t.Fatal("a admitted past its share of two askers")
	}
	// A third asker gets a slot once one is free (share 4/3 = 1).
	u.release(b)
	if !u.admit(c) || u.admit(c) {
		t.Fatal("c: want exactly one slot")
	}
}

// A busy provider is no failure: the fetch goes to the next one at once and
// nobody is avoided.
func TestSourceMovesOnFromABusyProvider(t *testing.T) {
	s, _, g, ids := setup(t, "busy", "ok")
	b, origin, err := readAll(t, s, 0, 1<<20)
	if err != nil || !bytes.Equal(b, g.data[:1<<20]) {
		t.Fatalf("%d bytes, %v", len(b), err)
	}
	if origin != ids[1].String() {
		t.Fatalf("origin %s, want the second provider %s", origin, ids[1])
	}
	if len(s.order([]peer.AddrInfo{{ID: ids[0]}})) != 1 {
		t.Fatal("the busy provider is avoided")
	}
}

// When every holder is busy the fetch waits its turn (Retry-After) and asks
// again, up to the busy wait; then it answers "don't have" so the origin
// fills the chunk.
func TestSourceWaitsWhenEveryHolderIsBusy(t *testing.T) {
	s, _, g, ids := setup(t, "busy", "busy")
	var mu sync.Mutex
	var waits []time.Duration
	clock := time.Now()
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	s.after = func(d time.Duration) <-chan time.Time {
		mu.Lock()
		waits = append(waits, d)
		clock = clock.Add(d)
		n := len(waits)
		mu.Unlock()
		if n == 2 {
			// The second wait ends with the first holder free again.
			g.mu.Lock()
			g.behave[ids[0]] = "ok"
			g.mu.Unlock()
		}
		ch := make(chan time.Time, 1)
		ch <- clock
		return ch
	}
	s.SetBusyWait(8 * time.Second)
	b, origin, err := readAll(t, s, 0, 1<<20)
	if err != nil || !bytes.Equal(b, g.data[:1<<20]) || origin != ids[0].String() {
		t.Fatalf("%d bytes from %s, %v; want the first holder once it was free", len(b), origin, err)
	}
	if len(waits) != 2 || waits[0] != time.Second {
		t.Fatalf("waited %v, want two turns of the 1s Retry-After", waits)
	}
	if n := testutil.CollectAndCount(s.m.busyWait); n != 1 {
		t.Fatalf("busy waits observed %d, want 1", n)
	}
	// Busy for longer than the wait: "don't have", the origin's turn.
	s2, _, _, _ := setup(t, "busy", "busy")
	s2.SetBusyWait(0)
	_, _, err = readAll(t, s2, 0, 10)
	if !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("every holder busy past the wait: %v, want ErrNotFound", err)
	}
}

// gatedStore serves one blob, holding every transfer until gate closes, so
// that transfers overlap.
type gatedStore struct {
	data []byte
	k    blob.Key
	gate chan struct{}
}

func (g gatedStore) OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	if k != g.k {
		return nil, -1, blob.ErrNotFound
	}
	end := min(off+n, int64(len(g.data)))
	if n < 0 {
		end = int64(len(g.data))
	}
	return io.NopCloser(io.MultiReader(gateReader{g.gate}, bytes.NewReader(g.data[off:end]))), int64(len(g.data)), nil
}

type gateReader struct{ gate chan struct{} }

func (r gateReader) Read([]byte) (int, error) { <-r.gate; return 0, io.EOF }

// Real nodes: a holder with one upload stream answers the askers beyond it
// "busy" at once; they read from the other holder, nobody is avoided, and
// every read succeeds.
func TestBusyHolderSendsAskersElsewhere(t *testing.T) {
	a := startNode(t, nil)
	c := startNode(t, nil, a)
	data := make([]byte, 16<<20)
	rand.Read(data)
	k := a.store.put(data)
	c.store.put(data)
	// The askers read a chunk a ranks first for (spread), so all of them
	// ask a before c.
	off := int64(-1)
	for o := int64(0); o < int64(len(data)); o += 1 << 20 {
		if rank(k, o, []peer.ID{a.ID(), c.ID()})[0] == a.ID() {
			off = o
			break
		}
	}
	if off < 0 {
		t.Fatal("a ranks first for none of 16 chunks")
	}
	gate := make(chan struct{})
	a.server.up = newUploads(1, 0, a.m.uploadsInFlight)
	a.AddStore(gatedStore{data: data, k: k, gate: gate})
	a.store.mu.Lock()
	delete(a.store.blobs, k) // a serves k only through the gated store
	a.store.mu.Unlock()
	var askers []*testNode
	for range 4 {
		askers = append(askers, startNode(t, nil, a))
	}
	for _, n := range append([]*testNode{c}, askers...) {
		waitFor(t, "routing table", func() bool { return n.RoutingTableSize() > 0 })
	}
	a.Announcer("test").Holding(k)
	c.Announcer("test").Holding(k)
	for _, h := range []*testNode{a, c} {
		waitFor(t, "advertised", func() bool { return counter(t, h.reg, "peerd_p2p_provides_total", "ok") > 0 })
	}
	for _, b := range askers {
		waitForProviders(t, b, k, 2)
	}
	// One transfer holds a's only slot.
	occupier := startNode(t, nil, a)
	first := make(chan error, 1)
	go func() {
		rc, _, err := occupier.client.GetRange(context.Background(), peer.AddrInfo{ID: a.ID(), Addrs: a.Addrs()}, k, 0, 10)
		if err == nil {
			io.ReadAll(rc)
			rc.Close()
		}
		first <- err
	}()
	waitFor(t, "a's slot taken", func() bool { return testutil.ToFloat64(a.m.uploadsInFlight) == 1 })
	var wg sync.WaitGroup
	errs := make(chan error, len(askers))
	for _, b := range askers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rc, _, err := b.Source().Fetch(context.Background(), k, off, 1<<20)
			if err == nil {
				var got []byte
				got, err = io.ReadAll(rc)
				rc.Close()
				if err == nil && !bytes.Equal(got, data[off:off+1<<20]) {
					err = errors.New("bytes differ")
				}
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(gate)
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("an asker's read failed: %v", err)
		}
	}
	<-first
	busySent := testutil.ToFloat64(a.m.serveRequests.WithLabelValues("busy"))
	var busyGot float64
	for _, b := range askers {
		busyGot += testutil.ToFloat64(b.m.busyReceived)
		b.Source().mu.Lock()
		avoided := len(b.Source().avoid)
		b.Source().mu.Unlock()
		if avoided != 0 {
			t.Fatalf("an asker avoids %d peers after busy answers", avoided)
		}
	}
	// An ask that a hedge overtook (c answered first) is cancelled, and a
	// busy answer a wrote for it may never be read: some must arrive, and
	// none that a did not send.
	if busySent == 0 || busyGot == 0 || busyGot > busySent {
		t.Fatalf("a sent %v busy answers, askers received %v: want some sent and received, no more received than sent", busySent, busyGot)
	}
	t.Logf("%d askers, holder with 1 stream: %v busy answers, every read served", len(askers), busySent)
}

// A paced transfer passes every byte unchanged and takes at most one piece
// (the bucket's burst) per read, so transfers take turns at the bucket.
func TestPacedReaderTakesTurns(t *testing.T) {
	u := newUploads(4, 8<<20, nil)
	data := make([]byte, 1<<20+5)
	rand.Read(data)
	r := u.paced(context.Background(), io.NopCloser(bytes.NewReader(data)))
	buf := make([]byte, 1<<20)
	var got []byte
	for {
		n, err := r.Read(buf)
		if n > uploadPiece {
			t.Fatalf("one read took %d bytes, more than a piece (%d)", n, uploadPiece)
		}
		got = append(got, buf[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatal("paced bytes differ")
	}
	if u.paced(context.Background(), io.NopCloser(bytes.NewReader(nil))) == nil || newUploads(4, 0, nil).limit != nil {
		t.Fatal("no rate must mean no bucket")
	}
}

// Spread: every node asks the same holder first for a chunk, and the
// chunks of a blob start at every holder, about evenly.
func TestSpreadStartsChunksAtEveryHolder(t *testing.T) {
	var ps []peer.AddrInfo
	for range 4 {
		ps = append(ps, peer.AddrInfo{ID: newPeerID(t)})
	}
	k := testKey()
	first := map[peer.ID]int{}
	for c := int64(0); c < 400; c++ {
		a := spread(k, c<<20, ps)
		b := spread(k, c<<20, []peer.AddrInfo{ps[3], ps[1], ps[0], ps[2]}) // another node's DHT order
		if a[0].ID != b[0].ID || len(a) != len(ps) {
			t.Fatalf("chunk %d: two orders of the same holders start at %s and %s", c, a[0].ID, b[0].ID)
		}
		first[a[0].ID]++
	}
	for _, p := range ps {
		if n := first[p.ID]; n < 50 {
			t.Fatalf("holder %s is first for %d of 400 chunks, want about 100: %v", p.ID, n, first)
		}
	}
}
