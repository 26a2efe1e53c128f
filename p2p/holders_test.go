package p2p

import (
	"slices"
	"strings"
	"testing"

	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus"
)

func TestHoldersAdvertiseWhileAnyStoreHoldsABlob(t *testing.T) {
	adv := newAdvertiser("blob", KeyToCID, 0, 1,
		prometheus.NewCounterVec(prometheus.CounterOpts{Name: "p"}, []string{"result"}), prometheus.NewGauge(prometheus.GaugeOpts{Name: "a"}))
	h := newHolders(adv)
	cache, ctrd := h.store("cache"), h.store("containerd")
	if again := h.store("cache"); again.bit != cache.bit || cache.bit == ctrd.bit {
		t.Fatalf("store bits: cache %b (again %b), containerd %b", cache.bit, again.bit, ctrd.bit)
	}
	k1 := blob.Key("sha256:" + strings.Repeat("1", 64))
	k2 := blob.Key("sha256:" + strings.Repeat("2", 64))
	url := blob.Key("url:" + strings.Repeat("3", 64))
	advertised := func() []blob.Key { l := adv.list(); slices.Sort(l); return l }

	cache.Holding(k1, url)
	ctrd.Holding(k1, k2)
	if got := advertised(); !slices.Equal(got, []blob.Key{k1, k2}) {
		t.Fatalf("advertised %v, want k1 and k2 (never a URL key)", got)
	}
	// containerd garbage-collects k1, which the cache still serves.
	ctrd.Dropped(k1)
	if got := advertised(); !slices.Equal(got, []blob.Key{k1, k2}) {
		t.Fatalf("after containerd dropped k1: %v, want k1 kept (the cache holds it)", got)
	}
	// A store dropping what it never held changes nothing.
	cache.Dropped(k2)
	if got := advertised(); !slices.Equal(got, []blob.Key{k1, k2}) {
		t.Fatalf("after the cache dropped k2 it never held: %v", got)
	}
	cache.Dropped(k1)
	ctrd.Dropped(k2)
	if got := advertised(); len(got) != 0 {
		t.Fatalf("after every store dropped everything: %v advertised", got)
	}
	if len(h.held) != 0 {
		t.Fatalf("%d keys still tracked", len(h.held))
	}
}
