package p2p

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	"github.com/peerd-project/peerd/blob"
)

// LocalStore is something this node holds blobs in and may serve to peers:
// the content cache, later a containerd content store. OpenLocal returns
// bytes [off, off+n) (n < 0: to the end) and the blob's size, or an error
// wrapping blob.ErrNotFound at once when it does not hold all of them. It
// must never fetch.
type LocalStore interface {
	OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error)
}

// WholeStore is a LocalStore that can tell whether it holds a blob whole
// and verified. The server hands such a blob to a few askers at a time
// (fan-out, uploads.go): those serve the others once they verified it.
type WholeStore interface {
	LocalStore
	HoldsWhole(k blob.Key) bool
}

// holdsWhole reports whether st holds k whole and verified (false for a
// store that cannot say).
func holdsWhole(st LocalStore, k blob.Key) bool {
	ws, ok := st.(WholeStore)
	return ok && ws.HoldsWhole(k)
}

// LocalStoreFunc adapts a function to LocalStore.
type LocalStoreFunc func(k blob.Key, off, n int64) (io.ReadCloser, int64, error)

func (f LocalStoreFunc) OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	return f(k, off, n)
}

const (
	// addrProtocol is the libp2p protocol a node answers with its data-plane
	// address, so providers need no second well-known port.
	addrProtocol = protocol.ID("/peerd/data-addr/1.0.0")
	// notHeldHeader marks a 404 that means "I don't hold these bytes".
	notHeldHeader = "X-Peerd-Not-Held"
	// zoneHeader carries the asker's --zone, so a holder can let one asker
	// per other zone cross at a time (uploads.go, fan-out).
	zoneHeader = "X-Peerd-Zone"
	// insistHeader marks a request whose asker waited its turn for the
	// longest it waits for others (fanoutWait): the holder serves it past its
	// fan-out (still within its stream and rate bounds).
	insistHeader = "X-Peerd-Insist"
	// busyHeader says why a 503 "busy" was sent: "streams" (the node's
	// upload bound), "fanout" (this blob went to enough askers lately)
	// or "zone" (an asker of the same zone has its turn for it).
	busyHeader = "X-Peerd-Busy"
	// wholeHeader on a 206 says the holder serves from a whole, verified
	// copy: the asker's swarm pull of the blob needs no origin.
	wholeHeader = "X-Peerd-Whole"
	// retryMsHeader is a busy answer's retry delay in milliseconds, finer
	// than Retry-After's whole seconds.
	retryMsHeader = "X-Peerd-Retry-Ms"
	// maxPeerHeaderBytes bounds a peer request's header block: peers send
	// a request line and a few short headers, and a larger block gets 431
	// rather than up to a megabyte buffered per connection.
	maxPeerHeaderBytes = 8 << 10
)

// ErrRangeNotSatisfiable is a peer's 416: the range starts at or past the
// blob's end. Every provider would answer the same, so the asker stops
// rather than trying (and blaming) the others.
var ErrRangeNotSatisfiable = errors.New("range not satisfiable")

var errNotMember = errors.New("peer is not a connected member of the cluster")

// peerFromCerts extracts and checks the libp2p identity bound into a TLS
// certificate chain (the libp2p TLS handshake's certificate extension).
func peerFromCerts(raw [][]byte) (peer.ID, error) {
	chain := make([]*x509.Certificate, len(raw))
	for i, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return "", fmt.Errorf("peer certificate: %w", err)
		}
		chain[i] = c
	}
	pk, err := libp2ptls.PubKeyFromCertChain(chain)
	if err != nil {
		return "", fmt.Errorf("peer certificate: %w", err)
	}
	return peer.IDFromPublicKey(pk)
}

func baseTLS(n *Node) (*tls.Config, error) {
	id, err := libp2ptls.NewIdentity(n.cfg.Key)
	if err != nil {
		return nil, fmt.Errorf("peer TLS identity: %w", err)
	}
	conf, _ := id.ConfigForPeer("")
	conf = conf.Clone()
	// HTTP/1.1 is the ALPN value net/http serves without a TLSNextProto hook.
	conf.NextProtos = []string{"http/1.1"}
	// Peers move whole chunks: full-size records from the first byte (the
	// small ones that speed up a browser's first paint only add records,
	// syscalls and AEAD calls here).
	conf.DynamicRecordSizingDisabled = true
	conf.VerifyPeerCertificate = nil
	return conf, nil
}
