package itest

import (
	"os"
	"path/filepath"
	"testing"
)

// The node others bootstrap from has no bootstrap list of its own. After a
// restart it must find the cluster again by itself: the others still have
// each other, so none of them would dial it.
func TestP2PRestartedBootstrapNodeRejoins(t *testing.T) {
	a := startP2PNode(t)
	b := startP2PNode(t, "--bootstrap", a.P2PAddr)
	c := startP2PNode(t, "--bootstrap", a.P2PAddr)
	waitReady(t, b.Node)
	waitReady(t, c.Node)
	waitMetric(t, a.Node, "peerd_p2p_connected_peers", 2)
	waitMetric(t, b.Node, "peerd_p2p_connected_peers", 2) // b and c found each other through the DHT

	a.Restart()
	if _, err := os.Stat(filepath.Join(a.DataDir, "peers.json")); err != nil {
		t.Fatalf("no peer book after a graceful stop: %v", err)
	}
	waitMetric(t, a.Node, "peerd_p2p_connected_peers", 2)
}
