package itest

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/peerd-project/peerd/internal/reliability"
)

var peerRequestHeaders = regexp.MustCompile(`msg="peer data-plane request".*headers=("[^"]*"|\S*)`)

// A client's Authorization (and every other client header) goes to the
// origin alone: node B reads through /blobs/ with a bearer token a blob that
// node A holds, and A's peer server sees only the peer protocol's headers
// and never the token.
func TestP2PClientHeadersNeverReachAPeer(t *testing.T) {
	origin := NewOrigin(t, "")
	allow := "--upstream-allow=" + origin.Host
	const size = 3<<20 + 77
	data, dg := RandomBlob(t, size)
	url := origin.Put(storagePath(dg), data)

	a := startP2PNode(t, patient(allow)...)
	b := startP2PNode(t, patient(allow, "--bootstrap", a.P2PAddr)...)
	waitReady(t, a.Node)
	waitReady(t, b.Node)
	waitMetric(t, a.Node, "peerd_p2p_connected_peers", 1)

	if code, _, body := Get(t, "GET", a.URL("/blobs/"+url), nil); code != 200 || Digest(body) != dg {
		t.Fatalf("A: status %d, digest %s", code, Digest(body))
	}
	waitMetric(t, a.Node, "peerd_p2p_provides_total", 1, "result=ok")

	const secret = "SECRETtoken4711"
	hdr := map[string]string{
		"Authorization": "Bearer " + secret,
		"Cookie":        "session=" + secret,
		"X-Custom":      secret,
	}
	if code, _, body := Get(t, "GET", b.URL("/blobs/"+url), hdr); code != 200 || Digest(body) != dg {
		t.Fatalf("B: status %d, digest %s", code, Digest(body))
	}
	served := a.Metric(t, "peerd_p2p_served_bytes_total")
	if served < size/2 {
		t.Fatalf("A served %v bytes to B, want most of %d: the read did not go through the peer", served, size)
	}

	allowed := []string{"Range", "User-Agent"}
	seen := map[string]int{}
	requests := 0
	for _, m := range peerRequestHeaders.FindAllStringSubmatch(a.Log(), -1) {
		requests++
		for _, name := range strings.Split(strings.Trim(m[1], `"`), ",") {
			seen[name]++
			if !slices.Contains(allowed, name) {
				t.Errorf("A's peer server received header %q from B", name)
			}
		}
	}
	if requests == 0 {
		t.Fatal("A logged no peer data-plane request")
	}
	for _, n := range []*p2pNode{a, b} {
		if strings.Contains(n.Log(), secret) {
			t.Errorf("the token appears in %s's log", n.Name)
		}
	}
	if t.Failed() {
		return
	}
	reliability.Record(t, reliability.Row{Area: "probe",
		Case:    "node B reads through /blobs/ with Authorization: Bearer, Cookie and X-Custom a blob node A holds",
		Outcome: "A's peer server receives only Range and User-Agent; the token is in neither node's log",
		Figure:  fmt.Sprintf("%d peer requests, %.0f bytes served by A, header names seen %v", requests, served, seen)})
}
