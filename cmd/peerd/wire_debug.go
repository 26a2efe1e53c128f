package main

import (
	"context"
	"slices"
	"strings"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/web"
)

// transferLogSize is how many recent transfers the node keeps in memory for
// the debug page and 'peerd status'.
const transferLogSize = 500

// debugView is the debug page's Provider: it reads the running parts.
type debugView struct{ a *app }

var _ web.Provider = debugView{}

func (v debugView) Snapshot() web.Snapshot {
	a := v.a
	s := web.Snapshot{
		Node:      v.node(),
		Cache:     web.Cache{Used: a.cache.Used(), Limit: int64(a.cfg.CacheSize), Blobs: len(a.cache.List())},
		Transfers: a.transfers.List(),
		Config:    a.cfg.settings,
	}
	if a.p2p != nil {
		for _, p := range a.p2p.Peers() {
			s.Peers = append(s.Peers, web.Peer{ID: p.ID.String(), Addr: p.Addr, Connected: p.Connected,
				ConnectedSince: p.ConnectedSince, RTT: p.RTT, ServedTo: p.ServedTo, ReadFrom: p.ReadFrom,
				Failures: p.Failures, LastFailure: p.LastFailure, AvoidedUntil: p.AvoidedUntil, Zone: p.Zone})
		}
	}
	for _, p := range a.cache.Pulls() {
		s.Swarm = append(s.Swarm, web.SwarmPull{Key: string(p.Key), Handles: p.Handles, Inflight: p.Inflight, Missing: p.Missing})
	}
	s.Containerd = v.containerd()
	if a.doctor != nil {
		rep, _ := a.doctor.lastReport()
		for _, r := range rep.Results {
			s.Doctor = append(s.Doctor, web.Finding{Check: r.Check, Status: string(r.Status), Saw: r.Saw, Fix: r.Fix})
		}
	}
	return s
}

func (v debugView) node() web.Node {
	a := v.a
	n := web.Node{Version: version, Started: a.started, Bootstrap: a.cfg.K8s.BootstrapMode, Runtime: a.runtimeMode()}
	if err := a.ready(); err != nil {
		n.ReadyReason = err.Error()
	} else {
		n.Ready = true
	}
	if a.p2p != nil {
		n.PeerID = a.p2p.ID().String()
		for _, m := range a.p2p.Addrs() {
			n.Addrs = append(n.Addrs, m.String())
		}
		n.PeerAddr = a.p2p.PeerAddr()
		n.RoutingTable = a.p2p.RoutingTableSize()
		n.Zone = a.p2p.Zone()
		zb := a.p2p.ZoneBytes()
		n.ZoneBytes = &web.ZoneBytes{ReceivedSame: zb.ReceivedSame, ReceivedCross: zb.ReceivedCross, ReceivedUnknown: zb.ReceivedUnknown,
			ServedSame: zb.ServedSame, ServedCross: zb.ServedCross, ServedUnknown: zb.ServedUnknown}
	} else {
		n.Bootstrap = "none (p2p off)"
	}
	return n
}

func (v debugView) containerd() web.Containerd {
	a := v.a
	c := web.Containerd{Mirror: "unknown (not checked yet, or no --registries)"}
	if a.ctrdStore == nil {
		c.Mirror = "containerd integration off"
		return c
	}
	c.Enabled, c.Socket = true, a.cfg.Containerd.Socket
	c.Connected, c.Version = a.ctrdStore.Connected(), a.ctrdStore.Version()
	c.Blobs = len(a.ctrdStore.Keys())
	if m := a.mirror.Load(); m != nil {
		if *m == "ok" {
			c.Mirror = "configured"
		} else {
			c.Mirror = "not configured: " + *m
		}
	}
	return c
}

func (v debugView) Blobs() []web.Blob {
	a := v.a
	infos := a.cache.List()
	out := make([]web.Blob, 0, len(infos))
	inCache := make(map[blob.Key]bool, len(infos))
	for _, i := range infos {
		inCache[i.Key] = true
		out = append(out, cacheBlob(i))
	}
	if a.ctrdStore != nil {
		for _, k := range a.ctrdStore.Keys() {
			if inCache[k] {
				continue
			}
			if size, ok := a.ctrdStore.Size(k); ok {
				out = append(out, web.Blob{Key: string(k), Size: size, Present: size, Verified: true, Store: "containerd", Sources: []string{"containerd"}})
			}
		}
	}
	slices.SortFunc(out, func(x, y web.Blob) int { return strings.Compare(x.Key, y.Key) })
	return out
}

// cacheBlob is the page's view of a cached blob.
func cacheBlob(i cache.Info) web.Blob {
	b := web.Blob{Key: string(i.Key), Size: i.Size, Present: i.Present, Verified: i.Verified, Store: "cache",
		Readers: i.Readers, LastAccess: i.LastAccess}
	if i.Filled.Containerd > 0 {
		b.Sources = append(b.Sources, "containerd")
	}
	if i.Filled.Peers > 0 {
		src := "peers"
		if len(i.Peers) > 0 {
			src += " (" + strings.Join(i.Peers, ", ") + ")"
		}
		b.Sources = append(b.Sources, src)
	}
	if i.Filled.Origin > 0 {
		b.Sources = append(b.Sources, "origin")
	}
	if len(b.Sources) == 0 {
		b.Sources = []string{"cache (held before this start)"}
	}
	return b
}

func (v debugView) Blob(key string) (web.BlobDetail, bool) {
	a := v.a
	k, err := blob.ParseKey(key)
	if err != nil {
		return web.BlobDetail{}, false
	}
	if i, ok := a.cache.Stat(k); ok {
		chunks, _ := a.cache.ChunkMap(k)
		return web.BlobDetail{Blob: cacheBlob(i), ChunkSize: a.cache.ChunkSize(), Chunks: chunks}, true
	}
	if a.ctrdStore != nil {
		if size, ok := a.ctrdStore.Size(k); ok {
			return web.BlobDetail{Blob: web.Blob{Key: string(k), Size: size, Present: size, Verified: true, Store: "containerd",
				Sources: []string{"containerd"}}}, true
		}
	}
	return web.BlobDetail{}, false
}

func (v debugView) Measure(ctx context.Context, ref string) (web.Measurement, error) {
	return v.a.measure(ctx, ref)
}

// startDebug mounts the debug page and its API at /debug/, on --http-addr
// only (never on the peer port).
func startDebug(ctx context.Context, a *app) error {
	a.extra[web.Prefix] = web.Handler(debugView{a}, web.Options{MeasureTimeout: measureTimeout})
	return nil
}
