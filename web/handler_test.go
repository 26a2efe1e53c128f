package web

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/transfer"
)

type resp struct {
	code int
	hdr  http.Header
	body string
}

func do(t *testing.T, h http.Handler, method, target string, body io.Reader, hdr ...string) resp {
	t.Helper()
	r := httptest.NewRequest(method, target, body)
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return resp{w.Code, w.Header(), w.Body.String()}
}

func TestRoutes(t *testing.T) {
	h := Handler(sample(), opts())
	form := "application/x-www-form-urlencoded"
	for _, tc := range []struct {
		method, path, ctype, body string
		code                      int
		want                      string
	}{
		{"GET", "/debug/", "", "", 200, "Recent transfers"},
		{"HEAD", "/debug/", "", "", 200, ""},
		{"GET", "/debug/?sort=size&order=asc&page=1", "", "", 200, "Size ▲"},
		{"GET", "/debug/blobs/" + layer2, "", "", 200, `class="unverified"`},
		{"GET", "/debug/static/page.css", "", "", 200, ".chunks"},
		{"GET", "/debug/static/page.js", "", "", 200, "data-refresh"},
		{"GET", "/debug/api/snapshot", "", "", 200, `"peerID"`},
		{"GET", "/debug/api/blobs?sort=key&order=asc", "", "", 200, `"items"`},
		{"GET", "/debug/api/blobs/" + layer1, "", "", 200, `"chunks"`},
		{"GET", "/debug/api/transfers?page=1", "", "", 200, `"face": "/v2/"`},
		{"POST", "/debug/measure", form, "ref=docker.io/library/app:1", 200, "280 MiB"},
		{"POST", "/debug/api/measure", "application/json", `{"ref":"docker.io/library/app:1"}`, 200, `"layers"`},

		{"GET", "/debug/nothing", "", "", 404, "no debug page"},
		{"GET", "/debug/api/nothing", "", "", 404, "no debug page"},
		{"GET", "/debug/api", "", "", 404, "no debug page"},
		{"GET", "/debug/static/other.css", "", "", 404, ""},
		{"GET", "/debug/pprof/heap", "", "", 404, "--debug-pprof"},
		{"GET", "/debug/blobs/sha256:" + strings.Repeat("9", 64), "", "", 404, "holds no part"},
		{"GET", "/debug/api/blobs/sha256:" + strings.Repeat("9", 64), "", "", 404, "holds no part"},
		{"GET", "/debug/blobs/", "", "", 400, "no blob key"},
		{"GET", "/debug/api/blobs/" + strings.Repeat("a", 201), "", "", 400, "longer than 200"},

		{"POST", "/debug/", form, "", 405, "use GET, HEAD"},
		{"DELETE", "/debug/api/snapshot", "", "", 405, "use GET, HEAD"},
		{"PUT", "/debug/blobs/" + layer1, "", "", 405, "use GET, HEAD"},
		{"GET", "/debug/measure", "", "", 405, "use POST"},
		{"GET", "/debug/api/measure", "", "", 405, "use POST"},

		{"GET", "/debug/?sort=colour", "", "", 400, "want one of access, key, present, readers, size, store, verified"},
		{"GET", "/debug/api/blobs?sort=colour", "", "", 400, "want one of"},
		{"GET", "/debug/api/blobs?order=up", "", "", 400, "want asc or desc"},
		{"GET", "/debug/api/blobs?page=0", "", "", 400, "want a page number from 1"},
		{"GET", "/debug/api/blobs?page=x", "", "", 400, "want a page number from 1"},
		{"GET", "/debug/api/blobs?page=2", "", "", 400, "past the last page, 1"},
		{"GET", "/debug/?tpage=9", "", "", 400, "past the last page"},
		{"GET", "/debug/?ppage=-1", "", "", 400, "want a page number"},
		{"GET", "/debug/api/transfers?page=2", "", "", 400, "past the last page"},

		{"POST", "/debug/measure", form, "ref=", 400, "no reference"},
		{"POST", "/debug/measure", form, "ref=a%20b", 400, "spaces"},
		{"POST", "/debug/api/measure", form, "ref=x", 415, "application/json"},
		{"POST", "/debug/api/measure", "application/json", `{"ref":1}`, 400, "bad JSON"},
		{"POST", "/debug/api/measure", "application/json", `{"ref":""}`, 400, "no reference"},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			var body io.Reader
			if tc.body != "" {
				body = strings.NewReader(tc.body)
			}
			r := do(t, h, tc.method, tc.path, body, "Content-Type", tc.ctype)
			if r.code != tc.code {
				t.Fatalf("status %d, want %d: %.300s", r.code, tc.code, r.body)
			}
			if !strings.Contains(r.body, tc.want) {
				t.Errorf("body lacks %q: %.500s", tc.want, r.body)
			}
			if tc.code == 405 && r.hdr.Get("Allow") == "" {
				t.Error("405 without Allow")
			}
			if tc.method == "HEAD" && r.body != "" {
				t.Errorf("HEAD with a body of %d bytes", len(r.body))
			}
			if csp := r.hdr.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") {
				t.Errorf("Content-Security-Policy %q", csp)
			}
		})
	}
}

func TestMeasureCrossOrigin(t *testing.T) {
	h := Handler(sample(), opts())
	for _, hdr := range [][]string{
		{"Sec-Fetch-Site", "cross-site"},
		{"Sec-Fetch-Site", "same-site"},
		{"Origin", "https://evil.example"},
	} {
		for _, path := range []string{"/debug/measure", "/debug/api/measure"} {
			ctype, body := "application/x-www-form-urlencoded", "ref=docker.io/library/app:1"
			if strings.Contains(path, "api") {
				ctype, body = "application/json", `{"ref":"docker.io/library/app:1"}`
			}
			r := do(t, h, "POST", path, strings.NewReader(body), append([]string{"Content-Type", ctype}, hdr...)...)
			if r.code != http.StatusForbidden || !strings.Contains(r.body, "cross-origin request refused") {
				t.Errorf("%s with %v: %d %.200s, want 403 with a reason", path, hdr, r.code, r.body)
			}
		}
	}
	// The page's own form: same origin.
	r := do(t, h, "POST", "/debug/measure", strings.NewReader("ref=a/b:c"),
		"Content-Type", "application/x-www-form-urlencoded", "Origin", "http://example.com", "Sec-Fetch-Site", "same-origin")
	if r.code != 200 {
		t.Errorf("same-origin measure: %d %.200s", r.code, r.body)
	}
}

func TestMeasureOneAtATime(t *testing.T) {
	f := sample()
	started, release := make(chan struct{}), make(chan struct{})
	f.measure = func(ctx context.Context, ref string) (Measurement, error) {
		close(started)
		<-release
		return Measurement{Ref: ref}, nil
	}
	h := Handler(f, opts())
	done := make(chan resp)
	go func() {
		done <- do(t, h, "POST", "/debug/measure", strings.NewReader("ref=a/b:c"), "Content-Type", "application/x-www-form-urlencoded")
	}()
	<-started
	r := do(t, h, "POST", "/debug/measure", strings.NewReader("ref=a/b:c"), "Content-Type", "application/x-www-form-urlencoded")
	if r.code != http.StatusConflict || !strings.Contains(r.body, "already running") {
		t.Errorf("second measure while one runs: %d %.200s", r.code, r.body)
	}
	r = do(t, h, "POST", "/debug/api/measure", strings.NewReader(`{"ref":"a/b:c"}`), "Content-Type", "application/json")
	if r.code != http.StatusConflict {
		t.Errorf("API measure while one runs: %d %.200s", r.code, r.body)
	}
	close(release)
	if r := <-done; r.code != 200 {
		t.Errorf("first measure: %d", r.code)
	}
	// Free again once it ended.
	f.measure = func(ctx context.Context, ref string) (Measurement, error) { return Measurement{}, ErrBusy }
	r = do(t, h, "POST", "/debug/api/measure", strings.NewReader(`{"ref":"a/b:c"}`), "Content-Type", "application/json")
	if r.code != http.StatusConflict {
		t.Errorf("provider's ErrBusy: %d, want 409", r.code)
	}
}

func TestMeasureTimeout(t *testing.T) {
	f := sample()
	f.measure = func(ctx context.Context, ref string) (Measurement, error) {
		<-ctx.Done()
		return Measurement{}, ctx.Err()
	}
	o := opts()
	o.MeasureTimeout = time.Millisecond
	r := do(t, Handler(f, o), "POST", "/debug/api/measure", strings.NewReader(`{"ref":"a/b:c"}`), "Content-Type", "application/json")
	var m Measurement
	if err := json.Unmarshal([]byte(r.body), &m); err != nil {
		t.Fatal(err)
	}
	if r.code != http.StatusGatewayTimeout || !strings.Contains(m.Error, "timed out") {
		t.Errorf("%d %+v, want 504 timed out", r.code, m)
	}
}

// TestInert puts markup and script into every field that comes from the
// network or a request and checks the page shows it as text.
func TestInert(t *testing.T) {
	f := sample()
	evilKey := "sha256:<script>alert(3)</script>"
	f.blobs = append(f.blobs, Blob{Key: evilKey, Size: 1, Store: "cache", Sources: []string{"<script>alert(4)</script>"}})
	f.snap.Peers[0].Addr = `"><script>alert(5)</script>`
	f.snap.Doctor[0].Saw = "<img src=x onerror=alert(6)>"
	f.snap.Transfers[0].Result = "<script>alert(7)</script>"
	f.details[evilKey] = BlobDetail{Blob: f.blobs[2], Chunks: "v"}
	f.measure = func(ctx context.Context, ref string) (Measurement, error) {
		return Measurement{Layers: []LayerMeasure{{Digest: "sha256:<b>x</b>", Peers: []string{"<script>alert(8)</script>"}, Error: "<i>bad</i>"}}}, nil
	}
	h := Handler(f, opts())
	pages := map[string]resp{
		"index":   do(t, h, "GET", "/debug/", nil),
		"blob":    do(t, h, "GET", "/debug/blobs/"+url.PathEscape(evilKey), nil),
		"measure": do(t, h, "POST", "/debug/measure", strings.NewReader("ref="+url.QueryEscape(evilRef)), "Content-Type", "application/x-www-form-urlencoded"),
	}
	for name, r := range pages {
		if r.code != 200 {
			t.Fatalf("%s: %d %.300s", name, r.code, r.body)
		}
		for _, bad := range []string{"<script>alert", "<img src=x", "<b>x</b>", "<i>bad</i>", "SECRET", "sig=", "hunter2"} {
			if strings.Contains(r.body, bad) {
				t.Errorf("%s holds %q live", name, bad)
			}
		}
		// Only the page's own script tag.
		if n := strings.Count(r.body, "<script"); n != 1 {
			t.Errorf("%s has %d <script tags, want 1", name, n)
		}
	}
	for name, want := range map[string][]string{
		"index":   {"&lt;script&gt;alert(2)&lt;/script&gt;", "&lt;script&gt;alert(3)", "&lt;script&gt;alert(4)", "&lt;script&gt;alert(5)", "&lt;img src=x onerror=alert(6)&gt;", "&lt;script&gt;alert(7)"},
		"blob":    {"sha256:&lt;script&gt;alert(3)&lt;/script&gt;"},
		"measure": {"&lt;script&gt;alert(1)&lt;/script&gt;", "&lt;script&gt;alert(8)", "&lt;i&gt;bad&lt;/i&gt;"},
	} {
		for _, w := range want {
			if !strings.Contains(pages[name].body, w) {
				t.Errorf("%s lacks the escaped text %q", name, w)
			}
		}
	}
	// The API is JSON, where a browser runs nothing, but it keeps secrets
	// out just the same.
	r := do(t, h, "GET", "/debug/api/snapshot", nil)
	for _, bad := range []string{"SECRET", "sig=", "hunter2"} {
		if strings.Contains(r.body, bad) {
			t.Errorf("snapshot API holds %q", bad)
		}
	}
	if ct := r.hdr.Get("Content-Type"); ct != "application/json" {
		t.Errorf("snapshot Content-Type %q", ct)
	}
}

func TestBlobPagination(t *testing.T) {
	f := sample()
	f.blobs = nil
	for i := range 250 {
		f.blobs = append(f.blobs, Blob{Key: fmt.Sprintf("sha256:%064d", i), Size: int64(i), Store: "cache"})
	}
	h := Handler(f, opts())
	get := func(q string) BlobPage {
		t.Helper()
		r := do(t, h, "GET", "/debug/api/blobs?"+q, nil)
		if r.code != 200 {
			t.Fatalf("%s: %d %s", q, r.code, r.body)
		}
		var p BlobPage
		if err := json.Unmarshal([]byte(r.body), &p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	p := get("sort=size&order=desc")
	if p.Total != 250 || p.Pages != 3 || len(p.Items) != 100 || p.Items[0].Size != 249 || p.Items[99].Size != 150 {
		t.Errorf("page 1 by size desc: total %d pages %d items %d first %d", p.Total, p.Pages, len(p.Items), p.Items[0].Size)
	}
	p = get("sort=size&order=asc&page=3")
	if len(p.Items) != 50 || p.Items[0].Size != 200 || p.Items[49].Size != 249 {
		t.Errorf("page 3 by size asc: %d items", len(p.Items))
	}
	if r := do(t, h, "GET", "/debug/api/blobs?page=4", nil); r.code != 400 {
		t.Errorf("page 4 of 3: %d", r.code)
	}
	// The HTML page links to the next page with the order kept.
	r := do(t, h, "GET", "/debug/?sort=size&order=asc&page=2", nil)
	if !strings.Contains(r.body, "page 2 of 3") || !strings.Contains(r.body, `href="/debug/?order=asc&amp;page=3&amp;sort=size#blobs"`) {
		t.Errorf("page 2's pager missing or wrong")
	}
}

// TestLarge renders the page of a node with 10,000 blobs, 500 peers and 500
// transfers: pagination bounds what one page carries.
func TestLarge(t *testing.T) {
	f := sample()
	f.blobs = nil
	for i := range 10000 {
		f.blobs = append(f.blobs, Blob{Key: fmt.Sprintf("sha256:%064x", i), Size: int64(i) << 12, Present: int64(i) << 12, Verified: i%2 == 0, Store: "cache", Sources: []string{"peers"}, LastAccess: now.Add(-time.Duration(i) * time.Second)})
	}
	f.snap.Peers = nil
	for i := range 500 {
		f.snap.Peers = append(f.snap.Peers, Peer{ID: fmt.Sprintf("12D3KooW%044d", i), Addr: fmt.Sprintf("10.0.%d.%d:30002", i/250, i%250), Connected: true, ConnectedSince: now.Add(-time.Hour)})
	}
	f.snap.Transfers = nil
	for i := range 500 {
		f.snap.Transfers = append(f.snap.Transfers, transfer.Record{Start: now, Face: transfer.FaceOCI, Key: fmt.Sprintf("sha256:%064x", i), Bytes: transfer.Bytes{Peers: 1 << 20}, Result: "ok"})
	}
	h := Handler(f, opts())
	start := time.Now()
	r := do(t, h, "GET", "/debug/?sort=size&order=desc&page=50", nil)
	took := time.Since(start)
	if r.code != 200 {
		t.Fatalf("%d %.300s", r.code, r.body)
	}
	t.Logf("the page of 10,000 blobs, 500 peers, 500 transfers: %d bytes in %v", len(r.body), took)
	// Three lists of a page each, plus the few rows of the other sections.
	if rows := strings.Count(r.body, "<tr"); rows > 3*100+20 {
		t.Errorf("%d table rows, want at most a page of each list", rows)
	}
	for _, want := range []string{"10000 listed", "page 50 of 100", "500 connected", "page 1 of 5"} {
		if !strings.Contains(r.body, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	start = time.Now()
	a := do(t, h, "GET", "/debug/api/blobs?page=100", nil)
	t.Logf("the API's last page of 10,000 blobs: %d bytes in %v", len(a.body), time.Since(start))
	if strings.Count(a.body, `"key"`) != 100 {
		t.Errorf("API page holds %d blobs, want 100", strings.Count(a.body, `"key"`))
	}
}

func TestChunkCells(t *testing.T) {
	cells, per, counts := chunkCells(BlobDetail{Chunks: "vp.v"})
	if per != 1 || len(cells) != 4 || cells[1].Class != "unverified" || cells[2].Class != "absent" || counts["verified"] != 2 {
		t.Errorf("small map: per %d cells %+v counts %v", per, cells, counts)
	}
	big := strings.Repeat("v", 3*maxCells)
	big = big[:5] + "." + big[6:]
	cells, per, _ = chunkCells(BlobDetail{Chunks: big})
	if per != 3 || len(cells) != maxCells || cells[1].Class != "absent" || cells[0].Class != "verified" {
		t.Errorf("big map: per %d, %d cells, cell 1 %q", per, len(cells), cells[1].Class)
	}
}

func TestFormat(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{Size(0), "0 B"}, {Size(1023), "1023 B"}, {Size(1536), "1.5 KiB"}, {Size(20 << 30), "20 GiB"}, {Size(-1), "?"}, {Size(300 << 20), "300 MiB"},
		{Duration(0), "-"}, {Duration(800 * time.Microsecond), "800µs"}, {Duration(2500 * time.Millisecond), "2.5s"},
		{Duration(192 * time.Minute), "3h12m"}, {Duration(50 * time.Hour), "2d2h"},
		{Speed(100<<20, 2*time.Second), "50 MiB/s"}, {Speed(1, 0), "-"},
		{Short("abcdefghijklmnopqrstuvwxyz", 10), "abcdef…xyz"}, {Short("abc", 10), "abc"},
		{Redact("https://u:p@h.example/a/b?sig=1#f"), "https://h.example/a/b"}, {Redact("docker.io/x?y"), "docker.io/x"},
		{Redact("https://h.example/p@x"), "https://h.example/p@x"},
		{RedactText(`Get "https://h.example/a?X-Amz-Signature=abc&b=1": EOF`), `Get "https://h.example/a?…": EOF`},
		{RedactText("dial tcp 10.0.0.2:30002: refused"), "dial tcp 10.0.0.2:30002: refused"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

// The node's peer bytes by zone relation are on the page and in the API
// when p2p is on, and absent otherwise.
func TestZoneBytes(t *testing.T) {
	f := sample()
	f.snap.Node.Zone = "eu-1a"
	f.snap.Node.ZoneBytes = &ZoneBytes{ReceivedSame: 300 << 20, ReceivedCross: 100 << 20, ServedSame: 5 << 20, ServedCross: 2 << 20, ServedUnknown: 1 << 20}
	h := Handler(f, opts())
	page := do(t, h, "GET", "/debug/", nil)
	for _, want := range []string{"Peer bytes by zone", "same zone 300 MiB, other zones 100 MiB, unknown 0 B", "same zone 5 MiB, other zones 2 MiB, unknown 1 MiB"} {
		if !strings.Contains(page.body, want) {
			t.Fatalf("page lacks %q", want)
		}
	}
	if api := do(t, h, "GET", "/debug/api/snapshot", nil); !strings.Contains(api.body, `"receivedCross": 104857600`) {
		t.Fatalf("snapshot lacks the zone bytes: %.400s", api.body)
	}
	f.snap.Node.ZoneBytes = nil
	if page := do(t, Handler(f, opts()), "GET", "/debug/", nil); strings.Contains(page.body, "Peer bytes by zone") {
		t.Fatal("zone bytes shown without p2p")
	}
}
