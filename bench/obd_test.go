package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// TestRangesOverOneConnCountsConnections checks the count row 7 uses to
// tell whether its ranges shared one kept-alive connection.
func TestRangesOverOneConnCountsConnections(t *testing.T) {
	const size, chunk = 4 << 20, 1 << 20
	body := bytes.Repeat([]byte("0123456789abcdef"), size/16)
	for _, tc := range []struct {
		name  string
		close bool
		want  int
	}{{"kept alive", false, 1}, {"closed after each response", true, size / chunk}} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if tc.close {
				w.Header().Set("Connection", "close")
			}
			http.ServeContent(w, r, "blob", time.Time{}, bytes.NewReader(body))
		}))
		_, conns, err := rangesOverOneConn(context.Background(), srv.URL, size, chunk)
		srv.Close()
		if err != nil || conns != tc.want {
			t.Errorf("%s: %d connections, %v; want %d", tc.name, conns, err, tc.want)
		}
	}
}
