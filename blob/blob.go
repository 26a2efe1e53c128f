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
	// hold the blob returns an error wrapping ErrNotFound, quickly.
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

// Trust says how far bytes may be passed on before the blob is verified.
type Trust uint8

const (
	// Untrusted bytes (from a peer) are re-served only after the whole blob
	// verified against its digest.
	Untrusted Trust = iota
	// Trusted bytes (from the origin or a local store) may be re-served at once.
	Trusted
)

// Truster is implemented by sources whose bytes may be re-served to peers
// before verification (the origin). Sources that don't implement it are
// untrusted.
type Truster interface {
	Trust() Trust
}

// TrustOf reports the trust level of a source.
func TrustOf(s Source) Trust {
	if t, ok := s.(Truster); ok {
		return t.Trust()
	}
	return Untrusted
}

// NotYet is a "don't have" (it matches ErrNotFound) from a source that will
// know better soon: a swarm pull's first chunk, asked before the nodes
// pulling the blob together could see each other. The caller may fetch the
// bytes elsewhere at once; when Ready is closed, Yield reports whether it
// should drop that fetch and ask this source again (another node fetches
// these bytes for everyone).
type NotYet struct {
	Ready <-chan struct{}
	Yield func() bool
}

func (*NotYet) Error() string { return "no answer yet" }

// Is makes a NotYet match ErrNotFound.
func (*NotYet) Is(target error) bool { return target == ErrNotFound }
