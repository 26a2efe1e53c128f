package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/browser"
	"github.com/peerd-project/peerd/web"
)

// checkDebugPage opens n's debug page right after a pull that peers served,
// in a real browser inside n's network namespace, with JavaScript and
// without: the page must name a peer n read from, list the pull's layers
// with their peer bytes, and show them verified. The screenshots go to
// $PEERD_SCREENSHOTS (else the cluster's folder) for a person to look at.
func (c *cluster) checkDebugPage(t *testing.T, n *node, im image) {
	t.Helper()
	browser.Need(t)
	out, err := sh(context.Background(), nsExec(n.ns, c.bin.client, "get", "-out", "-", "-timeout", "20s", "-url", "http://"+peerdHTTP+"/debug/api/snapshot")...)
	if err != nil {
		t.Fatalf("%s: debug snapshot: %v", n.name(), err)
	}
	var snap web.Snapshot
	if err := json.Unmarshal([]byte(out), &snap); err != nil {
		t.Fatalf("%s: debug snapshot: %v", n.name(), err)
	}
	var fromPeers int64
	var layers []string
	for _, tr := range snap.Transfers {
		for _, l := range im.layers {
			if tr.Key == l && tr.Bytes.Peers > 0 {
				fromPeers += tr.Bytes.Peers
				layers = append(layers, l)
			}
		}
	}
	var peer string
	for _, p := range snap.Peers {
		if p.ReadFrom > 0 {
			peer = p.ID
		}
	}
	if fromPeers == 0 || peer == "" {
		t.Fatalf("%s: the debug API shows no layer of %s served by peers (%d bytes) or no peer read from (%q)", n.name(), im.ref, fromPeers, peer)
	}
	dir := os.Getenv("PEERD_SCREENSHOTS")
	if dir == "" {
		dir = c.dir
	}
	for _, js := range []bool{true, false} {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		dom, err := browser.DumpDOMIn(ctx, n.ns, "http://"+peerdHTTP+"/debug/", js)
		cancel()
		if err != nil {
			t.Fatalf("%s: browser (js=%v): %v", n.name(), js, err)
		}
		// The page shortens digests and IDs to their ends: look for those.
		for _, want := range []string{peer[len(peer)-6:], layers[0][len(layers[0])-8:], "verified", "/v2/"} {
			if !strings.Contains(dom, want) {
				t.Errorf("%s: the page (js=%v) does not show %q", n.name(), js, want)
			}
		}
		file := filepath.Join(dir, fmt.Sprintf("e2e-%s-debug-js=%v.png", n.name(), js))
		ctx, cancel = context.WithTimeout(context.Background(), 2*time.Minute)
		if err := browser.ScreenshotIn(ctx, n.ns, "http://"+peerdHTTP+"/debug/", file, 1280, 2000, js); err != nil {
			t.Errorf("%s: screenshot (js=%v): %v", n.name(), js, err)
		}
		cancel()
		t.Logf("%s: debug page screenshot %s", n.name(), file)
	}
}
