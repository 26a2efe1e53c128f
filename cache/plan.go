package cache

import "github.com/peerd-project/peerd/blob"

// Plan says where the missing bytes of one blob come from. The cache tries
// Local, then Peers, then Origin; any may be nil. The role a source plays,
// not the source, decides how far its bytes may travel: Local and Origin
// bytes may be re-served to peers at once, Peers bytes only after the whole
// blob verified against its digest. Faces never build a Plan: one function
// in cmd/peerd does, for every face.
type Plan struct {
	// Local is a store on this node that holds whole blobs (containerd's
	// content store); its bytes are copied into the cache.
	Local blob.Source
	// Peers is the peer network. With an Origin behind it and a blob.Swarm
	// as the source, a read is a swarm pull (swarm.go).
	Peers blob.Source
	// Origin is where the blob lives: a registry, or the URL a /blobs/
	// request named.
	Origin blob.Source
}

// role is the part a source plays in a Plan.
type role uint8

const (
	roleLocal role = iota
	rolePeers
	roleOrigin
)

// trusted reports whether bytes from this role may be re-served before the
// blob verified.
func (r role) trusted() bool { return r != rolePeers }

// step is one source of a plan with its role.
type step struct {
	src  blob.Source
	role role
}

// steps lists the plan's sources in the order they are asked.
func (p Plan) steps() []step {
	out := make([]step, 0, 3)
	if p.Local != nil {
		out = append(out, step{p.Local, roleLocal})
	}
	if p.Peers != nil {
		out = append(out, step{p.Peers, rolePeers})
	}
	if p.Origin != nil {
		out = append(out, step{p.Origin, roleOrigin})
	}
	return out
}

// Empty reports whether the plan has no source at all.
func (p Plan) Empty() bool { return p.Local == nil && p.Peers == nil && p.Origin == nil }

// shared reports whether a read of k under this plan is a swarm pull: a
// digest that peers may hold, with the origin behind them. A read without an
// origin (a FUSE read of a blob containerd holds) is not one.
func (p Plan) shared(k blob.Key) bool {
	return k.Verifiable() && p.Peers != nil && p.Origin != nil
}

// swarm returns the peer source as a blob.Swarm when the plan makes a swarm
// pull and the source can split chunks; nil otherwise.
func (p Plan) swarm(k blob.Key) blob.Swarm {
	if !p.shared(k) {
		return nil
	}
	sw, _ := p.Peers.(blob.Swarm)
	return sw
}

// Planner builds the plan of a read of k for one face. origin is the origin
// the face knows for this request (the URL a /blobs/ request named, the
// registry of a /v2/ pull-through), or nil.
type Planner func(k blob.Key, origin blob.Source) Plan

// Plan is f's plan for k, or the origin alone when f is nil (a face wired
// without peers or local stores, as in tests).
func (f Planner) Plan(k blob.Key, origin blob.Source) Plan {
	if f == nil {
		return Plan{Origin: origin}
	}
	return f(k, origin)
}
