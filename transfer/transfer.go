// Package transfer keeps the node's recent transfers in memory: what each
// face served, and where the bytes came from. It answers an operator's first
// question about a pull, "did it come from peers?", on the debug page and in
// `peerd status`. It holds no secret: faces record a key and a redacted
// origin, never a query string or a header.
package transfer

import (
	"sync"
	"time"
)

// Face names where a transfer was served.
type Face string

const (
	FaceOCI   Face = "/v2/"    // the containerd mirror
	FaceBlobs Face = "/blobs/" // the Overlaybd proxy
	FaceFUSE  Face = "fuse"    // a file of the blob mount
	FacePeer  Face = "peer"    // served to another node
)

// Bytes counts a transfer's bytes by where they came from.
type Bytes struct {
	Cache      int64 `json:"cache"`      // present in the cache before the read
	Containerd int64 `json:"containerd"` // containerd's content store
	Peers      int64 `json:"peers"`      // other nodes
	Origin     int64 `json:"origin"`     // the registry or blob URL
}

// Total is the sum of all sources.
func (b Bytes) Total() int64 { return b.Cache + b.Containerd + b.Peers + b.Origin }

// Add adds o to b.
func (b *Bytes) Add(o Bytes) {
	b.Cache += o.Cache
	b.Containerd += o.Containerd
	b.Peers += o.Peers
	b.Origin += o.Origin
}

// Record is one transfer.
type Record struct {
	Start    time.Time     `json:"start"`
	Face     Face          `json:"face"`
	Key      string        `json:"key"`              // the blob's key (sha256:… or url:…)
	What     string        `json:"what,omitempty"`   // a redacted origin URL, a repository, a peer ID
	Bytes    Bytes         `json:"bytes"`            // bytes served, by source
	Duration time.Duration `json:"duration"`         // until the last byte or the failure
	Result   string        `json:"result"`           // "ok", or why it failed
	Peer     string        `json:"peer,omitempty"`   // for FacePeer: the node served
	Peers    []string      `json:"peers,omitempty"`  // the peers whose bytes it returned
	Status   int           `json:"status,omitempty"` // the HTTP status, for HTTP faces
}

// Log is a bounded ring of the latest records; the zero value is unusable,
// use NewLog. A nil *Log records nothing.
type Log struct {
	mu   sync.Mutex
	ring []Record
	next int
	full bool
}

// NewLog keeps the last n records.
func NewLog(n int) *Log {
	if n <= 0 {
		n = 1
	}
	return &Log{ring: make([]Record, n)}
}

// Add records r.
func (l *Log) Add(r Record) {
	if l == nil {
		return
	}
	l.mu.Lock()
	l.ring[l.next] = r
	l.next++
	if l.next == len(l.ring) {
		l.next, l.full = 0, true
	}
	l.mu.Unlock()
}

// List returns the records, newest first.
func (l *Log) List() []Record {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.next
	if l.full {
		n = len(l.ring)
	}
	out := make([]Record, 0, n)
	for i := 1; i <= n; i++ {
		out = append(out, l.ring[(l.next-i+len(l.ring))%len(l.ring)])
	}
	return out
}

// AddMerged records r, or folds it into a recent record of the same face,
// key and peer that ended at most window before r started: a peer reads a
// blob in many range requests, and one pull should be one record.
func (l *Log) AddMerged(r Record, window time.Duration) {
	if l == nil {
		return
	}
	l.mu.Lock()
	n := l.next
	if l.full {
		n = len(l.ring)
	}
	for i := 1; i <= min(n, 32); i++ {
		p := &l.ring[(l.next-i+len(l.ring))%len(l.ring)]
		if p.Face == r.Face && p.Key == r.Key && p.Peer == r.Peer && !r.Start.After(p.Start.Add(p.Duration).Add(window)) {
			p.Bytes.Add(r.Bytes)
			if end := r.Start.Add(r.Duration); end.After(p.Start.Add(p.Duration)) {
				p.Duration = end.Sub(p.Start)
			}
			if r.Result != "ok" {
				p.Result = r.Result
			}
			l.mu.Unlock()
			return
		}
	}
	l.mu.Unlock()
	l.Add(r)
}
