package httpmirror

import (
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/reliability"
	"github.com/peerd-project/peerd/upstream"
)

// longestLine is the length of the longest line of s.
func longestLine(s string) int {
	n := 0
	for _, l := range strings.Split(s, "\n") {
		n = max(n, len(l))
	}
	return n
}

// A 1 MiB request URI gets a short 414; a long URL under the limit is
// echoed in an error body and the logs only in a bounded form.
func TestLongURLsAreBounded(t *testing.T) {
	refused, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("cannot listen on 127.0.0.2: %v", err)
	}
	refusedAddr := refused.Addr().String()
	refused.Close()
	logs := &lockedBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	_, node := blobsNode(t, []string{"127.0.0.2"}, log, upstream.Options{})

	huge := node + "/blobs/http://" + refusedAddr + "/" + strings.Repeat("a", 1<<20) + "?sig=x"
	resp, body, took := getWithin(t, huge, 30*time.Second)
	if resp.StatusCode != http.StatusRequestURITooLong {
		t.Fatalf("1 MiB URL: status %s, want 414", resp.Status)
	}
	if len(body) > 512 {
		t.Fatalf("1 MiB URL: %d-byte body", len(body))
	}
	hugeBody := len(body)

	for _, tc := range []struct {
		name, url string
		status    int
	}{
		{"long path", "http://" + refusedAddr + "/" + strings.Repeat("b", 7000), http.StatusBadGateway},
		{"long host", "http://" + strings.Repeat("c", 7000) + ".example/x", http.StatusForbidden},
		{"long bad URL", "ftp://" + strings.Repeat("d", 7000), http.StatusBadRequest},
	} {
		resp, body, _ := getWithin(t, node+"/blobs/"+tc.url, 30*time.Second)
		if resp.StatusCode != tc.status {
			t.Fatalf("%s: status %s, want %d", tc.name, resp.Status, tc.status)
		}
		if len(body) > 1024 {
			t.Errorf("%s: %d-byte error body", tc.name, len(body))
		}
	}
	time.Sleep(100 * time.Millisecond) // let background fills log their end
	out := logs.String()
	if n := longestLine(out); n > 2048 {
		t.Errorf("a log line of %d bytes", n)
	}
	reliability.Record(t, reliability.Row{Area: "probe",
		Case:    "1 MiB /blobs/ URL; 7000-byte path, host and bad URL under the limit",
		Outcome: "414 with a one-line reason; errors and logs echo at most 256 bytes of a URL",
		Figure:  fmt.Sprintf("414 in %.1f ms, %d-byte body; longest log line %d bytes", float64(took.Microseconds())/1000, hugeBody, longestLine(out))})
}
