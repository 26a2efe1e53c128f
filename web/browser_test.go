package web

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/browser"
)

// screenshotDir is where the browser test leaves its screenshots for a
// person to look at: $PEERD_SCREENSHOTS, else the test's temporary folder.
func screenshotDir(t *testing.T) string {
	if d := os.Getenv("PEERD_SCREENSHOTS"); d != "" {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		return d
	}
	return t.TempDir()
}

// serve mounts the handler at /debug/ the way the daemon does, next to a
// stand-in for the profiler.
func serve(t *testing.T, f *fake) *httptest.Server {
	mux := http.NewServeMux()
	o := opts()
	// A short refresh lets the test see the script swap fresh sections in.
	o.Refresh = 200 * time.Millisecond
	mux.Handle(Prefix, Handler(f, o))
	mux.HandleFunc("/debug/pprof/", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("pprof")) })
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

// TestBrowser opens the page in headless Chromium, with JavaScript and
// without, reads the rendered DOM for what a person looks for after a pull
// that peers served, and saves screenshots.
func TestBrowser(t *testing.T) {
	browser.Need(t)
	srv := serve(t, sample())
	dir := screenshotDir(t)
	for _, js := range []bool{true, false} {
		name := map[bool]string{true: "js", false: "nojs"}[js]
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			dom, err := browser.DumpDOM(ctx, srv.URL+"/debug/", js)
			if err != nil {
				t.Fatal(err)
			}
			for _, want := range []string{
				"12D3KooWPeer",   // peers listed
				"10.0.0.2:30002", // a peer's address
				"280 MiB",        // the pull's peer bytes
				`class="num peers-text"`,
				`<span class="badge ok">verified</span>`, // the blob verified
				"&lt;script&gt;alert(2)",                 // the URL shown, inert
			} {
				if !strings.Contains(dom, want) {
					t.Errorf("rendered DOM lacks %q", want)
				}
			}
			// The script refreshed the sections, or, without it, did not.
			if refreshed := strings.Contains(dom, "refreshed every 0.2 s"); refreshed != js {
				t.Errorf("page refreshed itself: %v, want %v", refreshed, js)
			}
			for _, bad := range []string{"<script>alert", "SECRET", "hunter2"} {
				if strings.Contains(dom, bad) {
					t.Errorf("rendered DOM holds %q", bad)
				}
			}
			for _, page := range []struct{ file, path string }{
				{"debug-" + name + ".png", "/debug/"},
				{"blob-" + name + ".png", "/debug/blobs/" + layer2},
			} {
				file := filepath.Join(dir, page.file)
				if err := browser.Screenshot(ctx, srv.URL+page.path, file, 1280, 2000, js); err != nil {
					t.Fatal(err)
				}
				t.Logf("screenshot of %s: %s", page.path, file)
			}
		})
	}
}
