package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/transfer"
	"github.com/peerd-project/peerd/web"
)

func TestStatusDefaultIsRuns(t *testing.T) {
	if got := runDefault("http-addr"); got == "" || !strings.Contains(got, ":") {
		t.Fatalf("run's --http-addr default %q", got)
	}
}

func TestSnapshotURL(t *testing.T) {
	for addr, want := range map[string]string{
		"127.0.0.1:30000": "http://127.0.0.1:30000/debug/api/snapshot",
		"0.0.0.0:30000":   "http://127.0.0.1:30000/debug/api/snapshot",
		":30000":          "http://127.0.0.1:30000/debug/api/snapshot",
		"[::1]:30000":     "http://[::1]:30000/debug/api/snapshot",
	} {
		if got, err := snapshotURL(addr); err != nil || got != want {
			t.Errorf("%s: %q, %v; want %q", addr, got, err, want)
		}
	}
	if _, err := snapshotURL("nonsense"); err == nil {
		t.Error("bad --http-addr accepted")
	}
}

func sampleSnapshot(now time.Time) web.Snapshot {
	return web.Snapshot{
		Node:  web.Node{PeerID: "12D3KooWSelf", Version: "v1.2.3", Started: now.Add(-time.Hour), Ready: true, Bootstrap: "lease", RoutingTable: 3, Runtime: "containerd"},
		Peers: []web.Peer{{ID: "12D3KooWPeerA", Addr: "10.0.0.2:30002", Connected: true, ConnectedSince: now.Add(-time.Minute), RTT: time.Millisecond, ReadFrom: 300 << 20}},
		Cache: web.Cache{Used: 300 << 20, Limit: 10 << 30, Blobs: 1},
		Transfers: []transfer.Record{{Start: now, Face: transfer.FaceOCI, Key: "sha256:1111", What: "x",
			Bytes: transfer.Bytes{Peers: 280 << 20, Origin: 20 << 20}, Duration: 2 * time.Second, Result: "ok"}},
		Doctor: []web.Finding{{Check: "discard_unpacked_layers", Status: "warn", Saw: "true"}},
	}
}

func TestWriteStatus(t *testing.T) {
	now := time.Now()
	var b bytes.Buffer
	if err := writeStatus(&b, sampleSnapshot(now), now, 10, 10); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	t.Logf("\n%s", out)
	for _, want := range []string{"12D3KooWSelf", "up 1h0m", "ready", "300 MiB of 10 GiB", "10.0.0.2:30002", "280 MiB", "warn discard_unpacked_layers"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q", want)
		}
	}
	// Columns line up: PEERS starts at the same column in the header and
	// the row.
	lines := strings.Split(out, "\n")
	var hdr, row string
	for i, l := range lines {
		if strings.HasPrefix(l, "TIME") {
			hdr, row = l, lines[i+1]
		}
	}
	if col := strings.Index(hdr, "PEERS"); col < 0 || !strings.HasPrefix(row[col:], "280 MiB") {
		t.Errorf("PEERS column not aligned:\n%s\n%s", hdr, row)
	}
}

func TestStatusFromDaemon(t *testing.T) {
	now := time.Now()
	snap := sampleSnapshot(now)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/debug/api/snapshot" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(snap)
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	body, err := fetchSnapshot(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	var got web.Snapshot
	if err := json.Unmarshal(body, &got); err != nil || got.Node.PeerID != "12D3KooWSelf" {
		t.Fatalf("snapshot %+v, %v", got.Node, err)
	}
	if err := statusCmd([]string{"--http-addr", addr}); err != nil {
		t.Errorf("status: %v", err)
	}
}

func TestStatusUnreachable(t *testing.T) {
	// A port that was just free: nothing listens there.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	err = statusCmd([]string{"--http-addr", addr, "--timeout", "2s"})
	if err == nil || !strings.Contains(err.Error(), "cannot reach the daemon") {
		t.Errorf("status of no daemon: %v", err)
	}
	// Something that is not peerd.
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	err = statusCmd([]string{"--http-addr", strings.TrimPrefix(srv.URL, "http://")})
	if err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("status of a non-peerd server: %v", err)
	}
}
