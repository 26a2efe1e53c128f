// Package blob holds the vocabulary every peerd package shares: how a blob is
// named (Key), where missing bytes come from (Source), and the errors sources
// use to say "not here". It has no dependencies on the rest of peerd.
package blob

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
)

// Key names a blob in the cache and on the peer network.
//
// Content-addressed blobs are "sha256:<64 hex>" (an OCI digest): their bytes
// are verified against the key. Blobs fetched by URL without a digest in it
// are "url:<64 hex>", the sha256 of scheme://host/path (never the query, which
// carries signatures): they are never verified and never shared with peers.
type Key string

const (
	AlgSHA256 = "sha256"
	AlgURL    = "url"
)

// ErrNotFound is returned by a Source that does not hold the requested blob or
// range. Callers move on to the next source.
var ErrNotFound = errors.New("blob not found")

// ErrInvalidKey reports a malformed digest or key.
var ErrInvalidKey = errors.New("invalid blob key")

// ParseDigest parses an OCI digest "sha256:<64 lowercase hex>".
func ParseDigest(s string) (Key, error) {
	alg, hexPart, ok := strings.Cut(s, ":")
	if !ok || alg != AlgSHA256 || !isHex64(hexPart) {
		return "", fmt.Errorf("%w: %q (want sha256:<64 lowercase hex>)", ErrInvalidKey, s)
	}
	return Key(s), nil
}

// ParseKey parses either form of Key.
func ParseKey(s string) (Key, error) {
	alg, hexPart, ok := strings.Cut(s, ":")
	if !ok || (alg != AlgSHA256 && alg != AlgURL) || !isHex64(hexPart) {
		return "", fmt.Errorf("%w: %q", ErrInvalidKey, s)
	}
	return Key(s), nil
}

// FromHex makes a sha256 key from 64 lowercase hex characters.
func FromHex(h string) (Key, error) { return ParseDigest(AlgSHA256 + ":" + h) }

// FromURL keys a blob that has no digest by scheme, host and path.
func FromURL(u *url.URL) Key {
	sum := sha256.Sum256([]byte(strings.ToLower(u.Scheme) + "://" + strings.ToLower(u.Host) + u.EscapedPath()))
	return Key(AlgURL + ":" + hex.EncodeToString(sum[:]))
}

// Algorithm is "sha256" or "url".
func (k Key) Algorithm() string { a, _, _ := strings.Cut(string(k), ":"); return a }

// Hex is the 64 hex characters after the algorithm.
func (k Key) Hex() string { _, h, _ := strings.Cut(string(k), ":"); return h }

// Verifiable reports whether the key is a digest the bytes can be checked against.
func (k Key) Verifiable() bool { return k.Algorithm() == AlgSHA256 }

func (k Key) String() string { return string(k) }

func isHex64(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// Source supplies bytes the cache does not hold: peers, a containerd content
// store, an upstream origin.
type Source interface {
	// Name labels the source in metrics and logs ("peer", "upstream", ...).
	Name() string
	// Fetch returns a reader of bytes [off, off+n) of the blob and the blob's
	// total size (-1 when the source cannot tell). When off+n runs past the
	// end the reader returns the bytes up to the end. A source that does not
	// hold the blob returns an error wrapping ErrNotFound, quickly. An off at
	// or past the end is not asked (the cache asks only inside a size it
	// knows, or at 0 to learn it); a source may answer it with an error or
	// an empty reader.
	Fetch(ctx context.Context, k Key, off, n int64) (rc io.ReadCloser, size int64, err error)
}

// Attributed is implemented by readers whose bytes came from an identifiable
// party (a peer ID). The cache remembers it to blame that party if the blob
// later fails verification.
type Attributed interface {
	Origin() string
}

// Blamer is implemented by sources that want to hear that bytes they served
// (from the named origin) failed verification.
type Blamer interface {
	Blame(k Key, origin string)
}

// Swarm is a peer source that splits the chunks of a blob several nodes pull
// from the same origin at once between those nodes (p2p.Source). The cache
// asks it with FetchShared, instead of Fetch, when the read's plan has an
// origin behind the peers.
type Swarm interface {
	Source
	// FetchShared answers for the chunk [off, off+n) of k in one of three
	// ways: a Share with a Body (a peer serves the chunk); an error wrapping
	// ErrNotFound (this node fetches the chunk from the origin; cheap to
	// answer); or a Share with Gathering set (see Share).
	FetchShared(ctx context.Context, k Key, off, n int64) (Share, error)
	// Yields reports, once a Share's Gathering channel closed, whether
	// another node owns the chunk at off, so this node's origin fetch of it
	// should stop and the chunk be read from the swarm.
	Yields(k Key, off int64) bool
}

// Share is a Swarm's answer for one chunk.
type Share struct {
	// Body reads the chunk from a peer; Size is the blob's total size.
	Body io.ReadCloser
	Size int64
	// Gathering, with Body nil, says nobody was seen pulling the blob yet,
	// but nodes that started at the same moment may still show up. The
	// caller fetches the chunk from the origin at once, so a lone cold read
	// waits for nobody, and when Gathering closes asks Yields whether to
	// leave the chunk to its owner.
	Gathering <-chan struct{}
	// Release, when set, is called once the caller no longer waits for
	// Gathering (its chunk arrived, or it gave up): the Swarm may skip work
	// done only for it. A Share never released costs that work, no more.
	Release func()
}

// Announcer hears which blobs a store on this node (the cache, containerd's
// content store) starts and stops holding, so that the node advertises them
// to its peers and withdraws them. Calls come with no store lock held and
// must not block for long.
type Announcer interface {
	Holding(keys ...Key)
	Dropped(keys ...Key)
}
