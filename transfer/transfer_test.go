package transfer

import (
	"testing"
	"time"
)

func TestLogKeepsTheLatestNewestFirst(t *testing.T) {
	l := NewLog(3)
	for i := range 5 {
		l.Add(Record{Key: string(rune('a' + i))})
	}
	got := l.List()
	if len(got) != 3 || got[0].Key != "e" || got[1].Key != "d" || got[2].Key != "c" {
		t.Fatalf("list %+v, want e d c", got)
	}
	var nilLog *Log
	nilLog.Add(Record{})
	if nilLog.List() != nil {
		t.Fatal("a nil log listed records")
	}
}

func TestAddMergedFoldsOnePeersRangeRequests(t *testing.T) {
	l := NewLog(10)
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	rec := func(at time.Duration, peer, key string, n int64) Record {
		return Record{Start: t0.Add(at), Face: FacePeer, Key: key, Peer: peer, Bytes: Bytes{Cache: n}, Duration: 100 * time.Millisecond, Result: "ok"}
	}
	l.AddMerged(rec(0, "p1", "k", 10), time.Second)
	l.AddMerged(rec(500*time.Millisecond, "p1", "k", 20), time.Second) // same pull
	l.AddMerged(rec(600*time.Millisecond, "p2", "k", 5), time.Second)  // another peer
	l.AddMerged(rec(10*time.Second, "p1", "k", 7), time.Second)        // a later pull
	got := l.List()
	if len(got) != 3 {
		t.Fatalf("%d records, want 3: %+v", len(got), got)
	}
	if first := got[2]; first.Bytes.Cache != 30 || first.Duration != 600*time.Millisecond {
		t.Fatalf("merged record %+v, want 30 bytes over 600ms", first)
	}
	if got[0].Bytes.Cache != 7 || got[1].Peer != "p2" {
		t.Fatalf("records %+v", got)
	}
}
