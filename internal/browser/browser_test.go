package browser

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// page says whether its script ran: the text changes only with JavaScript.
const page = `<!DOCTYPE html><html><body><p id="x">static</p>
<script>document.getElementById("x").textContent = "script ran";</script></body></html>`

func TestDumpDOMAndScreenshot(t *testing.T) {
	Need(t)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		w.Write([]byte(page))
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, tc := range []struct {
		js         bool
		want, lack string
	}{{true, "script ran", ">static<"}, {false, ">static<", "script ran</p>"}} {
		dom, err := DumpDOM(ctx, srv.URL, tc.js)
		if err != nil {
			t.Fatalf("js=%v: %v", tc.js, err)
		}
		if !strings.Contains(dom, tc.want) || strings.Contains(dom, tc.lack) {
			t.Errorf("js=%v: DOM %q: want %q, not %q", tc.js, dom, tc.want, tc.lack)
		}
		file := filepath.Join(t.TempDir(), "shot.png")
		if err := Screenshot(ctx, srv.URL, file, 400, 300, tc.js); err != nil {
			t.Fatalf("js=%v: %v", tc.js, err)
		}
		b, err := os.ReadFile(file)
		if err != nil || !bytes.HasPrefix(b, []byte("\x89PNG")) {
			t.Errorf("js=%v: screenshot is not a PNG (%d bytes, %v)", tc.js, len(b), err)
		}
	}
}

func TestUnreachable(t *testing.T) {
	Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := DumpDOM(ctx, "http://127.0.0.1:1/", true); err == nil {
		t.Error("DumpDOM of a closed port: no error")
	}
}
