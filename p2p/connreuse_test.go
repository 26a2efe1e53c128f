package p2p

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/peerd-project/peerd/blob"
)

// Every answer of a peer's data plane, "not held" included, leaves its TLS
// connection open for the next request: in a swarm most asks are for chunks
// the peer does not have yet, and a TLS handshake (two signatures, a key
// exchange, a certificate check) costs far more CPU than the answer.
func TestDataConnectionIsReusedAfterEveryAnswer(t *testing.T) {
	a := startNode(t, nil)
	b := startNode(t, nil, a)
	data := bytes.Repeat([]byte("peerd"), 20000)
	k := a.store.put(data)
	missing := blob.Key("sha256:" + string(bytes.Repeat([]byte("0"), 64)))
	ai := peer.AddrInfo{ID: a.ID(), Addrs: a.Addrs()}
	ctx := context.Background()
	for i := range 5 {
		if _, _, err := b.client.GetRange(ctx, ai, missing, 0, 10); !errors.Is(err, blob.ErrNotFound) {
			t.Fatalf("ask %d for a blob A lacks: %v, want ErrNotFound", i, err)
		}
		rc, total, err := b.client.GetRange(ctx, ai, k, int64(i)*1000, 1000)
		if err != nil {
			t.Fatalf("range %d: %v", i, err)
		}
		// What a chunk fill does: exactly the bytes asked for, then Close.
		buf := make([]byte, 1000)
		if _, err := io.ReadFull(rc, buf); err != nil {
			t.Fatalf("range %d: %v", i, err)
		}
		rc.Close()
		if total != int64(len(data)) || !bytes.Equal(buf, data[i*1000:(i+1)*1000]) {
			t.Fatalf("range %d: wrong bytes or size %d", i, total)
		}
	}
	if got := testutil.ToFloat64(b.m.dials); got != 1 {
		t.Errorf("10 requests to one peer (5 answered 404, 5 with their range) opened %v TLS connections, want 1", got)
	}
}
