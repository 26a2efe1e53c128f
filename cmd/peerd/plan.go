package main

import (
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/cache"
)

// face is a part of peerd that reads blobs through the cache.
type face uint8

const (
	faceOCI   face = iota // the /v2/ mirror containerd pulls through
	faceBlobs             // the /blobs/ proxy (Overlaybd)
	faceFUSE              // the blob filesystem
)

// planner is the face's cache.Planner: the one place that says where a
// face's missing bytes come from.
func (a *app) planner(f face) cache.Planner {
	return func(k blob.Key, origin blob.Source) cache.Plan { return a.plan(f, k, origin) }
}

// plan builds every face's source plan.
//
//   - Peers: the peer network, for digests only (a URL-keyed blob is never
//     shared), when p2p is on.
//   - Local: containerd's content store, for the faces that read through
//     cache handles (FUSE, /blobs/): its bytes are copied into the cache,
//     whose chunked files those faces serve from. The /v2/ mirror and the
//     peer server read containerd in place instead (OCIConfig.Local and
//     p2p's AddStore, wired in startContainerd): they serve whole blobs, and
//     a copy would hold every image twice on disk.
//   - Origin: the one the request names (/blobs/ URL, /v2/ pull-through
//     registry); for the mount, which names none, the origin a /blobs/
//     request recently named for the digest.
//
// A plan with peers and an origin makes a swarm pull (cache/swarm.go).
func (a *app) plan(f face, k blob.Key, origin blob.Source) cache.Plan {
	var p cache.Plan
	if !k.Verifiable() {
		p.Origin = origin
		return p
	}
	if a.peers != nil {
		p.Peers = a.peers
	}
	if a.containerd != nil && f != faceOCI {
		p.Local = a.containerd
	}
	if origin == nil && f == faceFUSE {
		origin = a.learned.Origin(k)
	}
	p.Origin = origin
	return p
}
