package httpmirror

import (
	"bytes"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/internal/reliability"
	"github.com/peerd-project/peerd/upstream"
	"github.com/prometheus/client_golang/prometheus"
)

// lockedBuffer collects log output written from many goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// A signed origin URL that fails in any way leaves its signature (and the
// client's token) out of the response, every log line and the metrics.
func TestOriginErrorsNeverLeakSignature(t *testing.T) {
	const sig, token = "SECRETSIG", "SECRETTOKEN"
	refused, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("cannot listen on 127.0.0.2: %v", err)
	}
	refusedAddr := refused.Addr().String()
	refused.Close() // nothing listens there now: connection refused
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	_, originURL := loopbackServer(t, "127.0.0.2", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := "?X-Amz-Signature=" + sig + "-redirected&X-Amz-Credential=" + sig
		switch r.URL.Path {
		case "/500":
			http.Error(w, "internal error for "+r.URL.String(), http.StatusInternalServerError)
		case "/slow":
			select { // longer than the response-header timeout
			case <-time.After(5 * time.Second):
			case <-release:
			}
		case "/to-other-host":
			http.Redirect(w, r, "http://127.0.0.3:1/x"+q, http.StatusFound)
		case "/to-refused":
			http.Redirect(w, r, "http://"+refusedAddr+"/x"+q, http.StatusFound)
		case "/bad-location":
			w.Header().Set("Location", "http://127.0.0.2:1/%zz"+q)
			w.WriteHeader(http.StatusFound)
		case "/to-userinfo":
			http.Redirect(w, r, "http://user:"+sig+"@127.0.0.3:1/x", http.StatusFound)
		}
	}))
	logs := &lockedBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	reg := prometheus.NewRegistry()
	c, err := cache.Open(cache.Options{Dir: t.TempDir(), ChunkSize: 64 << 10, Logger: log, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	allow, _ := upstream.ParseAllowList([]string{"127.0.0.2"})
	up := upstream.NewClient(upstream.Options{Logger: log, Backoff: time.Millisecond, ResponseHeaderTimeout: 200 * time.Millisecond})
	_, node := loopbackServer(t, "127.0.0.1", New(Config{Cache: c, Upstream: up, Allow: allow, Logger: log, Registry: reg, Gatherer: reg}))

	signed := "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=" + sig + "&X-Amz-Signature=" + sig
	cases := []struct{ name, url string }{
		{"connection refused", "http://" + refusedAddr + "/f"},
		{"500", originURL + "/500"},
		{"response-header timeout", originURL + "/slow"},
		{"redirect to a host not allowed", originURL + "/to-other-host"},
		{"redirect to a refused port", originURL + "/to-refused"},
		{"unparsable Location", originURL + "/bad-location"},
		{"redirect with userinfo", originURL + "/to-userinfo"},
	}
	var statuses []string
	for _, tc := range cases {
		resp, body, _ := getWithin(t, node+"/blobs/"+tc.url+signed, 30*time.Second, "Authorization", "Bearer "+token)
		if resp.StatusCode < 400 {
			t.Fatalf("%s: status %s, want an error", tc.name, resp.Status)
		}
		var hdr bytes.Buffer
		resp.Header.Write(&hdr)
		for _, secret := range []string{sig, token} {
			if strings.Contains(string(body), secret) || strings.Contains(hdr.String(), secret) {
				t.Errorf("%s: %s in the response: %s\n%s", tc.name, secret, hdr.String(), body)
			}
		}
		t.Logf("%s: %d %s", tc.name, resp.StatusCode, strings.TrimSpace(string(body)))
		statuses = append(statuses, fmt.Sprintf("%s %d", tc.name, resp.StatusCode))
	}
	resp, metrics, _ := getWithin(t, node+"/metrics/prometheus", 10*time.Second)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("metrics: %s", resp.Status)
	}
	time.Sleep(100 * time.Millisecond) // let background fills log their end
	out := logs.String()
	for _, secret := range []string{sig, token} {
		if strings.Contains(out, secret) {
			t.Errorf("%s in the logs:\n%s", secret, out)
		}
		if bytes.Contains(metrics, []byte(secret)) {
			t.Errorf("%s in the metrics", secret)
		}
	}
	if !strings.Contains(out, "127.0.0.2") {
		t.Errorf("the logs do not name the origin at all:\n%s", out)
	}
	reliability.Record(t, reliability.Row{Area: "probe",
		Case:    "signed /blobs/ URL (X-Amz-Signature) and a token against an origin failing 7 ways",
		Outcome: "4xx/5xx with the reason; signature and token in no response, log line or metric",
		Figure:  fmt.Sprintf("%s; %d log bytes, 0 secrets", strings.Join(statuses, ", "), len(out))})
}
