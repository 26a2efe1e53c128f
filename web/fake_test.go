package web

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/peerd-project/peerd/transfer"
)

// fake is a Provider from fixed data.
type fake struct {
	mu      sync.Mutex
	snap    Snapshot
	blobs   []Blob
	details map[string]BlobDetail
	measure func(ctx context.Context, ref string) (Measurement, error)
	asked   []string // keys Blob was asked for
}

var _ Provider = (*fake)(nil)

func (f *fake) Snapshot() Snapshot { return f.snap }
func (f *fake) Blobs() []Blob      { return f.blobs }
func (f *fake) Blob(key string) (BlobDetail, bool) {
	f.mu.Lock()
	f.asked = append(f.asked, key)
	f.mu.Unlock()
	d, ok := f.details[key]
	return d, ok
}
func (f *fake) Measure(ctx context.Context, ref string) (Measurement, error) {
	if f.measure == nil {
		return Measurement{}, fmt.Errorf("no measure")
	}
	return f.measure(ctx, ref)
}

var now = time.Date(2026, 12, 3, 14, 0, 0, 0, time.UTC)

const (
	peerA   = "12D3KooWPeerAlphaxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
	peerB   = "12D3KooWPeerBravoyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy"
	layer1  = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	layer2  = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	evilRef = `reg.example/<script>alert(1)</script>:"x"`
	evilURL = `https://origin.example/<script>alert(2)</script>/blob?sig=SECRET&x=<b>`
)

// sample is a node right after a pull that peers served: two peers, a
// verified blob, a /v2/ transfer mostly from peers.
func sample() *fake {
	f := &fake{
		snap: Snapshot{
			Node: Node{
				PeerID: "12D3KooWSelfzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", Addrs: []string{"/ip4/10.0.0.1/tcp/30001"},
				PeerAddr: "10.0.0.1:30002", Version: "v1.2.3", Started: now.Add(-3*time.Hour - 12*time.Minute),
				Ready: true, Bootstrap: "lease", RoutingTable: 2, Runtime: "containerd",
			},
			Peers: []Peer{
				{ID: peerA, Addr: "10.0.0.2:30002", Connected: true, ConnectedSince: now.Add(-2 * time.Hour), RTT: 800 * time.Microsecond, ServedTo: 5 << 20, ReadFrom: 300 << 20},
				{ID: peerB, Addr: "10.0.0.3:30002", Connected: false, Failures: 3, LastFailure: "GET https://origin.example/x?sig=SECRET: connection refused", AvoidedUntil: now.Add(time.Minute)},
			},
			Cache: Cache{Used: 310 << 20, Limit: 20 << 30, Blobs: 2},
			Transfers: []transfer.Record{
				{Start: now.Add(-10 * time.Second), Face: transfer.FacePeer, Key: layer2, Peer: peerA, Bytes: transfer.Bytes{Cache: 5 << 20}, Duration: 90 * time.Millisecond, Result: "ok"},
				{Start: now.Add(-20 * time.Second), Face: transfer.FaceBlobs, Key: "url:" + strings.Repeat("ab", 32), What: evilURL, Bytes: transfer.Bytes{Origin: 1 << 20}, Duration: time.Second, Result: "ok", Status: 200},
				{Start: now.Add(-30 * time.Second), Face: transfer.FaceOCI, Key: layer1, What: "docker.io/library/app", Bytes: transfer.Bytes{Peers: 280 << 20, Origin: 20 << 20}, Duration: 2500 * time.Millisecond, Result: "ok", Status: 200},
			},
			Swarm:      []SwarmPull{{Key: layer2, Handles: 2, Inflight: 3, Missing: 10}},
			Containerd: Containerd{Enabled: true, Socket: "/run/containerd/containerd.sock", Connected: true, Version: "2.1.4", Mirror: "configured", Blobs: 42},
			Doctor: []Finding{
				{Check: "containerd", Status: "ok", Saw: "containerd 2.1.4"},
				{Check: "discard_unpacked_layers", Status: "warn", Saw: "true", Fix: "set discard_unpacked_layers = false"},
			},
			Config: []Setting{{Flag: "http-addr", Value: "127.0.0.1:30000", Source: "default"}, {Flag: "registry-token", Value: "hunter2", Source: "env"}},
		},
		blobs: []Blob{
			{Key: layer1, Size: 300 << 20, Present: 300 << 20, Verified: true, Store: "cache", Sources: []string{"peers", "origin"}, LastAccess: now.Add(-30 * time.Second)},
			{Key: layer2, Size: 10 << 20, Present: 5 << 20, Store: "cache", Sources: []string{"origin"}, Readers: 2, LastAccess: now.Add(-time.Minute)},
		},
		details: map[string]BlobDetail{},
	}
	f.details[layer1] = BlobDetail{Blob: f.blobs[0], ChunkSize: 1 << 20, Chunks: strings.Repeat("v", 300)}
	f.details[layer2] = BlobDetail{Blob: f.blobs[1], ChunkSize: 1 << 20, Chunks: "vvvpp....."}
	f.measure = func(ctx context.Context, ref string) (Measurement, error) {
		return Measurement{
			Ref: ref, Started: now, Duration: 3 * time.Second,
			Layers: []LayerMeasure{
				{Digest: layer1, Size: 300 << 20, Bytes: transfer.Bytes{Peers: 280 << 20, Origin: 20 << 20}, Peers: []string{peerA}, Duration: 2500 * time.Millisecond},
				{Digest: layer2, Size: 10 << 20, Bytes: transfer.Bytes{Cache: 10 << 20}, Duration: 20 * time.Millisecond},
			},
			Total: transfer.Bytes{Peers: 280 << 20, Origin: 20 << 20, Cache: 10 << 20},
		}, nil
	}
	return f
}

func opts() Options { return Options{Now: func() time.Time { return now }} }
