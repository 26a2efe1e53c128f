package p2p

import (
	"context"
	"crypto/rand"
	"encoding/base32"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"runtime"
	"slices"
	"testing"

	ds "github.com/ipfs/go-datastore"
	dsq "github.com/ipfs/go-datastore/query"
	dstest "github.com/ipfs/go-datastore/test"
)

// The record store passes go-datastore's own conformance suite.
func TestRecordStoreConformance(t *testing.T) {
	dstest.SubtestAll(t, newRecordStore(1<<20, nil, nil))
}

func queryKeys(t *testing.T, d ds.Datastore, q dsq.Query) []string {
	t.Helper()
	r, err := d.Query(context.Background(), q)
	if err != nil {
		t.Fatal(err)
	}
	es, err := r.Rest()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Key+"="+string(e.Value))
	}
	slices.Sort(out)
	return out
}

// Random puts, deletes and prefix queries over provider-shaped keys give
// the same answers as go-datastore's map datastore.
func TestRecordStoreMatchesMapDatastore(t *testing.T) {
	ctx := context.Background()
	ours, ref := newRecordStore(1<<20, nil, nil), ds.NewMapDatastore()
	rnd := mrand.New(mrand.NewPCG(1, 2))
	key := func() ds.Key {
		switch rnd.IntN(4) {
		case 0:
			return ds.NewKey(fmt.Sprintf("/providers/K%d", rnd.IntN(5)))
		case 1:
			return ds.NewKey(fmt.Sprintf("/other/K%d/P%d/x", rnd.IntN(5), rnd.IntN(3)))
		default:
			return ds.NewKey(fmt.Sprintf("/providers/K%d/P%d", rnd.IntN(5), rnd.IntN(8)))
		}
	}
	prefixes := []string{"", "/", "/providers", "/providers/", "providers/K1", "/providers/K", "/providers/K2", "/other/K1", "/providers/K3/P1", "/nothing"}
	for i := range 3000 {
		k := key()
		switch rnd.IntN(3) {
		case 0, 1:
			v := []byte(fmt.Sprint(i))
			if err := ours.Put(ctx, k, v); err != nil {
				t.Fatal(err)
			}
			ref.Put(ctx, k, v)
		case 2:
			ours.Delete(ctx, k)
			ref.Delete(ctx, k)
		}
		p := prefixes[rnd.IntN(len(prefixes))]
		if got, want := queryKeys(t, ours, dsq.Query{Prefix: p}), queryKeys(t, ref, dsq.Query{Prefix: p}); !slices.Equal(got, want) {
			t.Fatalf("step %d, prefix %q:\n got %v\nwant %v", i, p, got, want)
		}
		gv, gerr := ours.Get(ctx, k)
		wv, werr := ref.Get(ctx, k)
		if string(gv) != string(wv) || (gerr == nil) != (werr == nil) {
			t.Fatalf("step %d: Get(%s) = %q, %v; want %q, %v", i, k, gv, gerr, wv, werr)
		}
	}
	n := len(queryKeys(t, ref, dsq.Query{}))
	if ours.n != n {
		t.Fatalf("store counts %d records, holds %d", ours.n, n)
	}
}

// A full store refuses new records but still takes updates of the ones it
// holds, and makes room as records are deleted.
func TestRecordStoreBounded(t *testing.T) {
	ctx := context.Background()
	var reported, refused int
	s := newRecordStore(2, func(n int) { reported = n }, func() { refused++ })
	for _, k := range []string{"/providers/A/1", "/providers/A/2"} {
		if err := s.Put(ctx, ds.NewKey(k), []byte("t")); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Put(ctx, ds.NewKey("/providers/B/1"), []byte("t")); !errors.Is(err, errRecordsFull) {
		t.Fatalf("third record: %v, want errRecordsFull", err)
	}
	if got := queryKeys(t, s, dsq.Query{Prefix: "/providers/B"}); len(got) != 0 {
		t.Fatalf("refused record is visible: %v", got)
	}
	if err := s.Put(ctx, ds.NewKey("/providers/A/1"), []byte("u")); err != nil {
		t.Fatalf("update in a full store: %v", err)
	}
	if err := s.Delete(ctx, ds.NewKey("/providers/A/2")); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, ds.NewKey("/providers/B/1"), []byte("t")); err != nil {
		t.Fatalf("after a delete: %v", err)
	}
	if reported != 2 || s.n != 2 {
		t.Fatalf("reported %d records, counted %d; want 2", reported, s.n)
	}
	if refused != 1 {
		t.Fatalf("reported %d refusals, want 1", refused)
	}
}

// BenchmarkProviderQuery is the DHT's question on a lookup's path, "who
// provides this blob?", for a blob the node holds no record of, on a node
// storing 100,000 records: the record store vs the map datastore kad-dht
// uses by default.
func BenchmarkProviderQuery(b *testing.B) {
	for _, c := range []struct {
		name string
		d    ds.Datastore
	}{{"recordStore", newRecordStore(1<<20, nil, nil)}, {"MapDatastore", ds.NewMapDatastore()}} {
		ctx := context.Background()
		for i := range 100_000 {
			c.d.Put(ctx, ds.NewKey(fmt.Sprintf("/providers/BLOB%d/PEER%d", i/10, i%10)), []byte("12345678"))
		}
		b.Run(c.name, func(b *testing.B) {
			for i := 0; b.Loop(); i++ {
				r, _ := c.d.Query(ctx, dsq.Query{Prefix: fmt.Sprintf("/providers/NONE%d", i)})
				if es, _ := r.Rest(); len(es) != 0 {
					b.Fatal("found records")
				}
			}
		})
	}
}

// BenchmarkRecordStoreMemory reports the heap a stored provider record
// costs, with keys shaped like kad-dht's (/providers/<base32 multihash of a
// sha256 digest>/<base32 peer ID>) and a varint timestamp as the value: 10
// holders for each of 10,000 blobs.
func BenchmarkRecordStoreMemory(b *testing.B) {
	const blobs, holders = 10_000, 10
	enc := base32.StdEncoding.WithPadding(base32.NoPadding)
	peers := make([]string, holders)
	for i := range peers {
		id := make([]byte, 38) // an Ed25519 peer ID's multihash
		rand.Read(id)
		peers[i] = enc.EncodeToString(id)
	}
	for b.Loop() {
		runtime.GC()
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		s := newRecordStore(1<<20, nil, nil)
		ctx := context.Background()
		mh := make([]byte, 34)
		for range blobs {
			rand.Read(mh)
			blob := enc.EncodeToString(mh)
			for _, p := range peers {
				if err := s.Put(ctx, ds.NewKey("/providers/"+blob+"/"+p), []byte{0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01}); err != nil {
					b.Fatal(err)
				}
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&m1)
		b.ReportMetric(float64(m1.HeapAlloc-m0.HeapAlloc)/(blobs*holders), "bytes/record")
		runtime.KeepAlive(s)
	}
}
