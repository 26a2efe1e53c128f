package httpmirror

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

// Extra prefix routes nest: the longest matching prefix answers, every time
// (a map's order must not decide).
func TestExtraRoutesLongestPrefixWins(t *testing.T) {
	say := func(s string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, s) })
	}
	srv := New(Config{Extra: map[string]http.Handler{
		"/debug/": say("page"), "/debug/pprof/": say("pprof"), "/debug/api/doctor": say("doctor"),
		"/d/": say("d"), "/de/": say("de"), "/deb/": say("deb"), "/debu/": say("debu"),
	}})
	for i := 0; i < 50; i++ {
		for path, want := range map[string]string{"/debug/pprof/heap": "pprof", "/debug/": "page", "/debug/blobs/x": "page", "/debug/api/doctor": "doctor"} {
			rec := httptest.NewRecorder()
			srv.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
			if got := rec.Body.String(); got != want {
				t.Fatalf("GET %s answered by %q, want %q", path, got, want)
			}
		}
	}
}
