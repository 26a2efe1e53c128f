package p2p

import (
	"context"
	"crypto/sha3"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"
	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus"
)

// Tag resolution between peers (the --resolve-tags opt-in).
//
// A node advertises, for every tag its own image store holds (of a listed
// registry), a provider record under TagCID. A node asked for a tag it does
// not hold finds those providers and asks a few of them over the
// authenticated data plane (GET /tags/<registry>/<repo>:<tag>); each answers
// from its own image store only, with the digest and the time it last set
// the tag. The newest answer wins. The caller then fetches the manifest by
// that digest, which verifies the bytes: a peer can point a tag at the wrong
// (but genuine) manifest, never hand out forged content.
//
// Tags are mutable: the answer is what some peer pulled earlier, which may
// be older than what the registry says now.

// tagKeyDomain separates tag keys from anything else hashed with SHA3.
const tagKeyDomain = "peerd/tag/v1\x00"

const (
	// Bounds on one resolution: finding providers, then asking them.
	defaultTagFindTimeout = time.Second
	defaultTagAskTimeout  = 2 * time.Second
	// How many providers are asked at once, and how long the others may
	// answer after the first did (a newer answer may be among them).
	tagAskFanout = 3
	tagAskGrace  = 100 * time.Millisecond
	// A lookup collects providers for tagFindGrace after the first: a few
	// more give the newest-answer choice and failover; the whole query is
	// not worth waiting for.
	tagFindGrace = 20 * time.Millisecond
	// tagLocalTimeout bounds a lookup in the local image store for a peer.
	tagLocalTimeout = 5 * time.Second
	// maxTagAnswers bounds the peers' questions answered at once (each is
	// a call to the local image store); past it askers get 503 and move on.
	maxTagAnswers   = 32
	maxTagAnswer    = 4096
	maxManifestSize = 4 << 20
)

var (
	// The distribution spec's repository name and tag grammar.
	tagRepoRE = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)
	tagTagRE  = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
	// A registry host as containerd sends it in ?ns=: host or host:port.
	tagRegRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?$`)
)

// TagRef names a tag of a registry: Registry is the host (and port) as
// containerd names it ("docker.io", "127.0.0.1:5000").
type TagRef struct {
	Registry, Repo, Tag string
}

func (r TagRef) String() string { return r.Registry + "/" + r.Repo + ":" + r.Tag }

// ParseTagRef checks and normalizes the parts of a tag reference.
func ParseTagRef(registry, repo, tag string) (TagRef, error) {
	registry = strings.ToLower(registry)
	switch {
	case len(registry) > 255 || !tagRegRE.MatchString(registry):
		return TagRef{}, fmt.Errorf("invalid registry host %q", registry)
	case len(repo) > 255 || !tagRepoRE.MatchString(repo):
		return TagRef{}, fmt.Errorf("invalid repository name %q", repo)
	case !tagTagRE.MatchString(tag):
		return TagRef{}, fmt.Errorf("invalid tag %q", tag)
	}
	return TagRef{Registry: registry, Repo: repo, Tag: tag}, nil
}

// ParseTagName parses "<registry>/<repo>:<tag>" (containerd's image names).
// Names pinned by digest ("...@sha256:...") are not tags.
func ParseTagName(s string) (TagRef, error) {
	if strings.Contains(s, "@") {
		return TagRef{}, fmt.Errorf("%q is pinned by digest, not a tag", s)
	}
	reg, rest, ok := strings.Cut(s, "/")
	i := strings.LastIndexByte(rest, ':')
	if !ok || i < 0 {
		return TagRef{}, fmt.Errorf("%q is not <registry>/<repo>:<tag>", s)
	}
	return ParseTagRef(reg, rest[:i], rest[i+1:])
}

// TagCID is the DHT key of a tag. Its multihash is SHA3-256 of a
// domain-separated reference, where every blob key is a SHA2-256 multihash:
// the DHT keys records by multihash, so a different hash function code keeps
// tag keys and blob keys apart even for a blob whose bytes are the reference.
func TagCID(r TagRef) cid.Cid {
	sum := sha3.Sum256([]byte(tagKeyDomain + r.String()))
	mh, _ := multihash.Encode(sum[:], multihash.SHA3_256) // Encode never fails
	return cid.NewCidV1(cid.Raw, mh)
}

// TagTarget is what a tag points to in some node's image store.
type TagTarget struct {
	Digest    blob.Key `json:"digest"`
	MediaType string   `json:"mediaType,omitempty"`
	Size      int64    `json:"size"`
	// Updated is when that node's image store last set the tag.
	Updated time.Time `json:"updated"`
}

func (t TagTarget) check() error {
	if _, err := blob.ParseDigest(string(t.Digest)); err != nil {
		return err
	}
	if t.Size <= 0 || t.Size > maxManifestSize {
		return fmt.Errorf("manifest size %d out of range", t.Size)
	}
	return nil
}

// TagLookup resolves a tag in this node's own image store, never elsewhere;
// an unknown tag is an error wrapping blob.ErrNotFound.
type TagLookup func(ctx context.Context, r TagRef) (TagTarget, error)

// TagOptions configure tag resolution.
type TagOptions struct {
	// Registries whose tags are advertised, answered and resolved; others never are.
	Registries []string
	// Local is this node's image store; nil when it has none (it then only asks).
	Local TagLookup
	// FindTimeout bounds the provider lookup, AskTimeout the questions to peers.
	FindTimeout, AskTimeout time.Duration
}

// Tags advertises the tags this node holds and resolves tags through peers.
type Tags struct {
	n          *Node
	lg         *slog.Logger
	opts       TagOptions
	registries map[string]bool
	interval   time.Duration
	m          tagMetrics

	// Replaced in tests.
	find func(ctx context.Context, c cid.Cid) []peer.AddrInfo
	ask  func(ctx context.Context, ai peer.AddrInfo, r TagRef) (TagTarget, error)
	now  func() time.Time

	busy chan struct{} // bounds concurrent answers to peers

	ads *advertiser[TagRef] // the tags this node's image store holds
}

type tagMetrics struct {
	resolves   *prometheus.CounterVec // result: peer, not_found, refused, error
	answers    *prometheus.CounterVec // result: ok, not_found, refused, bad_request, error
	provides   *prometheus.CounterVec // result: ok, error
	advertised prometheus.Gauge
}

func newTagMetrics(reg prometheus.Registerer) tagMetrics {
	m := tagMetrics{
		resolves: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_p2p_tag_resolves_total",
			Help: "Tags this node asked peers for, by result (peer: a peer answered, not_found, refused: registry not listed, error).",
		}, []string{"result"}),
		answers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_p2p_tag_requests_total",
			Help: "Peers' tag questions this node answered from its own image store, by result (ok, not_found, refused, busy, bad_request, error).",
		}, []string{"result"}),
		provides: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_p2p_tag_provides_total", Help: "DHT provides of tags, by result (ok, error).",
		}, []string{"result"}),
		advertised: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "peerd_p2p_advertised_tags", Help: "Tags of the local image store this node advertises on the DHT.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.resolves, m.answers, m.provides, m.advertised)
	}
	return m
}

// EnableTags turns on tag advertising, answering and resolution; it may be
// called once. The advertising loop stops with the node.
func (n *Node) EnableTags(opts TagOptions) (*Tags, error) {
	if len(opts.Registries) == 0 {
		return nil, errors.New("tag resolution needs at least one registry")
	}
	t := newTags(n, opts)
	n.server.mu.Lock()
	if n.server.tags != nil {
		n.server.mu.Unlock()
		return nil, errors.New("tag resolution is already enabled")
	}
	n.server.tags = t
	n.server.mu.Unlock()
	t.m = newTagMetrics(n.cfg.Registerer)
	t.find = n.findTagProviders
	t.ask = n.askTag
	t.ads.provides, t.ads.advertised = t.m.provides, t.m.advertised
	t.ads.provide = func(ctx context.Context, c cid.Cid) error { return n.dht.Provide(ctx, c, true) }
	t.ads.canRun = func() bool { return n.RoutingTableSize() > 0 }
	n.wg.Add(1)
	go func() { defer n.wg.Done(); t.ads.run(n.ctx) }()
	return t, nil
}

func newTags(n *Node, opts TagOptions) *Tags {
	if opts.FindTimeout <= 0 {
		opts.FindTimeout = defaultTagFindTimeout
	}
	if opts.AskTimeout <= 0 {
		opts.AskTimeout = defaultTagAskTimeout
	}
	t := &Tags{n: n, opts: opts, registries: map[string]bool{}, interval: time.Hour,
		now: time.Now, busy: make(chan struct{}, maxTagAnswers),
		m: newTagMetrics(nil), lg: slog.New(slog.DiscardHandler)}
	if n != nil {
		t.interval = n.cfg.ReprovideInterval
		t.lg = n.log
	}
	// A few at a time: an image store holds few tags.
	t.ads = newAdvertiser("tag", func(r TagRef) (cid.Cid, error) { return TagCID(r), nil }, t.interval, 8, t.m.provides, t.m.advertised)
	t.ads.log = t.lg
	for _, r := range opts.Registries {
		t.registries[strings.ToLower(r)] = true
	}
	return t
}

// Listed reports whether the tags of registry may be served.
func (t *Tags) Listed(registry string) bool { return t.registries[strings.ToLower(registry)] }

// Set replaces the tags this node advertises with those its image store
// holds now: new ones are advertised at once, dropped ones are no longer
// re-advertised (their records expire; meanwhile this node answers "not
// held" for them). Tags of unlisted registries are ignored.
func (t *Tags) Set(refs []TagRef) {
	want := make(map[TagRef]bool, len(refs))
	for _, r := range refs {
		if t.Listed(r.Registry) {
			want[r] = true
		}
	}
	t.ads.set(want)
}

// Held lists the advertised tags, sorted.
func (t *Tags) Held() []TagRef {
	out := t.ads.list()
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out
}
