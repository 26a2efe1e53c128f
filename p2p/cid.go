package p2p

import (
	"encoding/hex"
	"fmt"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"
	"github.com/peerd-project/peerd/blob"
)

// KeyToCID names a blob on the DHT: the digest's bytes as a sha256 multihash
// in a CIDv1 with the raw codec. Only sha256 keys can be shared; url: keys
// are never advertised (their bytes cannot be checked).
func KeyToCID(k blob.Key) (cid.Cid, error) {
	if !k.Verifiable() {
		return cid.Undef, fmt.Errorf("%w: %q is not a sha256 digest", blob.ErrInvalidKey, k)
	}
	if _, err := blob.ParseDigest(string(k)); err != nil {
		return cid.Undef, err
	}
	sum, err := hex.DecodeString(k.Hex())
	if err != nil {
		return cid.Undef, fmt.Errorf("%w: %v", blob.ErrInvalidKey, err)
	}
	mh, err := multihash.Encode(sum, multihash.SHA2_256)
	if err != nil {
		return cid.Undef, err
	}
	return cid.NewCidV1(cid.Raw, mh), nil
}

// CIDToKey is KeyToCID's inverse.
func CIDToKey(c cid.Cid) (blob.Key, error) {
	dec, err := multihash.Decode(c.Hash())
	if err != nil {
		return "", fmt.Errorf("%w: %v", blob.ErrInvalidKey, err)
	}
	if dec.Code != multihash.SHA2_256 || len(dec.Digest) != 32 {
		return "", fmt.Errorf("%w: multihash %s is not sha2-256", blob.ErrInvalidKey, multihash.Codes[dec.Code])
	}
	return blob.FromHex(hex.EncodeToString(dec.Digest))
}
