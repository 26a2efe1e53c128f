// Package web is the node's read-only debug page (/debug/) and its JSON API
// (/debug/api/), served on --http-addr only. The page is a view of the API's
// data; a Provider in cmd/peerd gathers it from the running parts.
package web

import (
	"context"
	"time"

	"github.com/peerd-project/peerd/transfer"
)

// Provider is what the page reads. Every method answers from memory, fast:
// the page must stay responsive with 10,000 blobs and 500 peers.
type Provider interface {
	// Snapshot is everything but the blob list.
	Snapshot() Snapshot
	// Blobs lists the blobs the node holds (cache and containerd).
	Blobs() []Blob
	// Blob is one blob with its chunk map; false if the node holds none of it.
	Blob(key string) (BlobDetail, bool)
	// Measure pulls an image reference (registry/repo:tag or @digest) or
	// one blob (a digest with the image's reference for its registry)
	// through this node's own mirror and reports where each layer's bytes
	// came from. At most one runs at a time (ErrBusy otherwise).
	Measure(ctx context.Context, ref string) (Measurement, error)
}

// Snapshot is the node as the page shows it.
type Snapshot struct {
	Node       Node              `json:"node"`
	Peers      []Peer            `json:"peers"`
	Cache      Cache             `json:"cache"`
	Transfers  []transfer.Record `json:"transfers"` // newest first
	Swarm      []SwarmPull       `json:"swarm"`     // swarm pulls in flight
	Containerd Containerd        `json:"containerd"`
	Doctor     []Finding         `json:"doctor"`
	Config     []Setting         `json:"config"`
}

// Node is this node.
type Node struct {
	PeerID       string    `json:"peerID"`
	Addrs        []string  `json:"addrs"`    // libp2p addresses
	PeerAddr     string    `json:"peerAddr"` // the peer data plane
	Version      string    `json:"version"`
	Started      time.Time `json:"started"`
	Ready        bool      `json:"ready"`
	ReadyReason  string    `json:"readyReason,omitempty"` // why not ready
	Bootstrap    string    `json:"bootstrap"`             // the bootstrap mode, e.g. "lease", "dns", "static", "none"
	RoutingTable int       `json:"routingTable"`          // peers in the DHT routing table
	Runtime      string    `json:"runtime"`               // "containerd" or "none"
	Zone         string    `json:"zone,omitempty"`
	// ZoneBytes: blob bytes received from and served to peers, by the
	// peer's zone against this node's (nil when p2p is off).
	ZoneBytes *ZoneBytes `json:"zoneBytes,omitempty"`
}

// ZoneBytes is a node's peer bytes by zone relation.
type ZoneBytes struct {
	ReceivedSame    int64 `json:"receivedSame"`
	ReceivedCross   int64 `json:"receivedCross"`
	ReceivedUnknown int64 `json:"receivedUnknown"`
	ServedSame      int64 `json:"servedSame"`
	ServedCross     int64 `json:"servedCross"`
	ServedUnknown   int64 `json:"servedUnknown"`
}

// Peer is a node this one is connected to or has dealt with.
type Peer struct {
	ID             string        `json:"id"`
	Addr           string        `json:"addr"`
	Connected      bool          `json:"connected"`
	ConnectedSince time.Time     `json:"connectedSince,omitzero"`
	RTT            time.Duration `json:"rtt"`      // 0 when unknown
	ServedTo       int64         `json:"servedTo"` // blob bytes this node sent it
	ReadFrom       int64         `json:"readFrom"` // blob bytes this node read from it
	Failures       int           `json:"failures"` // recent failed transfers
	LastFailure    string        `json:"lastFailure,omitempty"`
	AvoidedUntil   time.Time     `json:"avoidedUntil,omitzero"` // zero when not avoided
	Zone           string        `json:"zone,omitempty"`
}

// Cache is the cache's totals.
type Cache struct {
	Used  int64 `json:"used"`
	Limit int64 `json:"limit"`
	Blobs int   `json:"blobs"`
}

// Blob is one blob the node holds (some of).
type Blob struct {
	Key        string    `json:"key"`
	Size       int64     `json:"size"`    // -1 when unknown
	Present    int64     `json:"present"` // bytes held
	Verified   bool      `json:"verified"`
	Store      string    `json:"store"`   // "cache" or "containerd"
	Sources    []string  `json:"sources"` // where its chunks came from: "origin", "peers", "containerd"
	Readers    int       `json:"readers"` // open handles now
	LastAccess time.Time `json:"lastAccess,omitzero"`
}

// BlobDetail is a blob with its chunk map.
type BlobDetail struct {
	Blob
	ChunkSize int64 `json:"chunkSize"`
	// Chunks has one byte per chunk: '.' absent, 'p' from a peer and not
	// yet verified, 'v' verified or from a trusted source.
	Chunks string `json:"chunks"`
}

// SwarmPull is a blob several nodes may be pulling through this one now.
type SwarmPull struct {
	Key      string `json:"key"`
	Handles  int    `json:"handles"`  // readers on this node
	Inflight int    `json:"inflight"` // chunk fills running
	Missing  int    `json:"missing"`  // chunks not yet present
}

// Containerd is the containerd link and the mirror check.
type Containerd struct {
	Enabled   bool   `json:"enabled"`
	Socket    string `json:"socket,omitempty"`
	Connected bool   `json:"connected"`
	Version   string `json:"version,omitempty"`
	Mirror    string `json:"mirror"` // "configured", "not configured: <why>", "unknown"
	Blobs     int    `json:"blobs"`  // blobs of its content store the node shares
}

// Finding is one check of `peerd doctor`.
type Finding struct {
	Check  string `json:"check"`
	Status string `json:"status"` // "ok", "warn", "fail"
	Saw    string `json:"saw"`
	Fix    string `json:"fix,omitempty"`
}

// Setting is one effective flag value (after the environment).
type Setting struct {
	Flag   string `json:"flag"`
	Value  string `json:"value"`
	Source string `json:"source"` // "default", "flag", "env"
}

// Measurement is the result of Measure.
type Measurement struct {
	Ref      string         `json:"ref"`
	Started  time.Time      `json:"started"`
	Duration time.Duration  `json:"duration"`
	Layers   []LayerMeasure `json:"layers"`
	Total    transfer.Bytes `json:"total"`
	Error    string         `json:"error,omitempty"`
}

// LayerMeasure is one blob of a measured pull.
type LayerMeasure struct {
	Digest    string         `json:"digest"`
	MediaType string         `json:"mediaType,omitempty"`
	Size      int64          `json:"size"`
	Bytes     transfer.Bytes `json:"bytes"`
	Peers     []string       `json:"peers,omitempty"` // the peers that served it
	Duration  time.Duration  `json:"duration"`
	Error     string         `json:"error,omitempty"`
}
