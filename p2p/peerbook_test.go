package p2p

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

func TestPeerBookRoundTripAndDamage(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "peers.json")
	if got := loadPeerBook(path); got != nil {
		t.Fatalf("missing book: %v", got)
	}
	id, err := peer.Decode("12D3KooWGRUVh2upKTEzP1ys5uvWZxeDCmGjE1WdQbdv9f5wNGt3")
	if err != nil {
		t.Fatal(err)
	}
	a := ma.StringCast("/ip4/127.0.0.9/tcp/30001")
	if err := savePeerBook(path, []peer.AddrInfo{{ID: id, Addrs: []ma.Multiaddr{a}}, {ID: id}}); err != nil {
		t.Fatal(err)
	}
	got := loadPeerBook(path)
	if len(got) != 1 || got[0].ID != id || len(got[0].Addrs) != 1 || !got[0].Addrs[0].Equal(a) {
		t.Fatalf("round trip: %v", got)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Fatalf("book mode %v", st.Mode().Perm())
	}
	os.WriteFile(path, []byte("{not json"), 0o600)
	if got := loadPeerBook(path); got != nil {
		t.Fatalf("damaged book: %v", got)
	}
}
