package itest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/browser"
	"github.com/peerd-project/peerd/internal/reliability"
	"github.com/peerd-project/peerd/internal/testenv"
	"github.com/peerd-project/peerd/web"
)

// The operator's view after a pull that peers served: two real nodes and a
// real registry. Node A measures an image (its bytes come from the
// registry), node B measures it next (from A); B's debug API, its page in a
// real browser (with and without JavaScript) and `peerd status` all say so.
func TestDebugPageShowsAPullPeersServed(t *testing.T) {
	browser.Need(t)
	reg, img, a, b := registryAndTwoNodes(t, 300<<10, 2<<20+17)

	ref := reg.Host + "/team/app:v1"
	ma := measure(t, a.Node, ref)
	if ma.Total.Origin == 0 || ma.Total.Peers != 0 {
		t.Fatalf("A's measurement: %+v, want every byte from the registry", ma.Total)
	}
	waitMetric(t, a.Node, "peerd_p2p_provides_total", float64(len(img.layers)+1), "result=ok")
	mb := measure(t, b.Node, ref)
	var layerBytes int64
	for _, l := range img.layers {
		layerBytes += int64(len(l))
	}
	if mb.Total.Peers < layerBytes || mb.Total.Origin != 0 {
		t.Fatalf("B's measurement: %+v, want the layers' %d bytes from peers and none from the registry", mb.Total, layerBytes)
	}
	for _, l := range mb.Layers {
		if l.Error != "" || l.Bytes.Peers > 0 && (len(l.Peers) != 1 || l.Peers[0] != a.ID) {
			t.Fatalf("B's layer %+v: want no error and A (%s) named as the peer", l, a.ID)
		}
	}

	// The API: B's transfers list the pull with its peer bytes; A is a peer
	// B read those bytes from.
	var snap web.Snapshot
	getJSON(t, b.URL("/debug/api/snapshot"), &snap)
	var fromPeers int64
	for _, tr := range snap.Transfers {
		if tr.Face == "/v2/" {
			fromPeers += tr.Bytes.Peers
		}
	}
	if fromPeers < layerBytes {
		t.Fatalf("B's /v2/ transfers carry %d bytes from peers, want at least %d", fromPeers, layerBytes)
	}
	var sawA bool
	for _, p := range snap.Peers {
		if p.ID == a.ID && p.Connected && p.ReadFrom >= layerBytes {
			sawA = true
		}
	}
	if !sawA {
		t.Fatalf("B's peers %+v: want A connected with at least %d bytes read from it", snap.Peers, layerBytes)
	}
	layer := img.layerDigests[1]
	ctrdWaitFor(t, 30*time.Second, "B verified the layer", func() bool {
		var d web.BlobDetail
		getJSON(t, b.URL("/debug/api/blobs/"+layer), &d)
		return d.Verified && !strings.Contains(d.Chunks, ".")
	})

	// The page, as a person sees it: in a real browser, with JavaScript and
	// without.
	outDir := os.Getenv("PEERD_SCREENSHOTS")
	if outDir == "" {
		outDir = t.TempDir()
	}
	for _, js := range []bool{true, false} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		dom, err := browser.DumpDOM(ctx, b.URL("/debug/"), js)
		cancel()
		if err != nil {
			t.Fatalf("browser (js=%v): %v", js, err)
		}
		for _, want := range []string{a.ID[:16], layer[:19], "peers"} {
			if !strings.Contains(dom, want) {
				t.Errorf("page (js=%v) does not show %q", js, want)
			}
		}
		if !strings.Contains(strings.ToLower(dom), "verified") {
			t.Errorf("page (js=%v) shows no verified blob", js)
		}
		file := filepath.Join(outDir, fmt.Sprintf("e2e-debug-js=%v.png", js))
		ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
		if err := browser.Screenshot(ctx, b.URL("/debug/"), file, 1280, 2000, js); err != nil {
			t.Errorf("screenshot (js=%v): %v", js, err)
		}
		cancel()
		t.Logf("screenshot: %s", file)
	}

	// The terminal view.
	out, err := exec.Command(peerdBin, "status", "--http-addr", b.HTTPAddr).CombinedOutput()
	if err != nil {
		t.Fatalf("peerd status: %v\n%s", err, out)
	}
	t.Logf("peerd status:\n%s", out)
	for _, want := range []string{a.ID[:12], "/v2/"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("peerd status does not show %q", want)
		}
	}
	reliability.Record(t, reliability.Row{Area: "operator",
		Case:    "debug page, API and `peerd status` after a 2-node pull through a real registry",
		Outcome: "B's measurement, transfers, peers and page (Chromium, JS on and off) show the layers came from A",
		Figure:  fmt.Sprintf("A: %d B from the registry; B: %d B from peers, %d from the registry", ma.Total.Origin, mb.Total.Peers, mb.Total.Origin)})
}

// measure runs the debug API's measurement of ref on n.
func measure(t *testing.T, n *Node, ref string) web.Measurement {
	t.Helper()
	body, _ := json.Marshal(web.MeasureRequest{Ref: ref})
	req, _ := http.NewRequest(http.MethodPost, n.URL("/debug/api/measure"), bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 3 * time.Minute}).Do(req)
	if err != nil {
		t.Fatalf("measure on %s: %v", n.Name, err)
	}
	defer resp.Body.Close()
	var m web.Measurement
	if resp.StatusCode != http.StatusOK {
		var buf bytes.Buffer
		buf.ReadFrom(resp.Body)
		t.Fatalf("measure on %s: %s %s", n.Name, resp.Status, buf.String())
	}
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s measured %s: %+v in %s", n.Name, ref, m.Total, m.Duration)
	if m.Error != "" || len(m.Layers) == 0 {
		t.Fatalf("measure on %s: %+v", n.Name, m)
	}
	return m
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	code, _, body := Get(t, "GET", url, nil)
	if code != http.StatusOK {
		t.Fatalf("GET %s: %d %s", url, code, body)
	}
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
}

// registryAndTwoNodes starts a real registry holding team/app:v1 (layers of
// the given sizes) and two ready nodes that mirror it, B bootstrapped from
// A, patient enough that a loaded machine does not send them to the origin.
func registryAndTwoNodes(t *testing.T, layerSizes ...int) (*ctrdRegistry, *ociImage, *p2pNode, *p2pNode) {
	t.Helper()
	reg := startCtrdRegistry(t, testenv.LookPath(t, "docker-registry", "docker-registry"))
	img := makeOCIImage(t, "team/app", "v1", layerSizes...)
	reg.push(t, img)
	flags := patient("--registries", "http://"+reg.Host)
	a := startP2PNode(t, flags...)
	b := startP2PNode(t, append(flags, "--bootstrap", a.P2PAddr)...)
	waitReady(t, a.Node)
	waitReady(t, b.Node)
	return reg, img, a, b
}
