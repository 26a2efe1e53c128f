package upstream

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/blob/sourcetest"
)

// trickle writes zeros in 8 KiB pieces, each flushed, every 20 ms until the
// client goes away: a slow origin that never goes quiet long enough for a
// timeout of the client to fire.
func trickle(w http.ResponseWriter, r *http.Request) {
	piece := make([]byte, 8<<10)
	for {
		if _, err := w.Write(piece); err != nil {
			return
		}
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// conformanceOrigin serves the suite's blobs at /blobs/<key>. honourRange
// picks a well-behaved origin (206 with Content-Range, via
// http.ServeContent) or one that ignores Range and sends every body whole,
// chunked, with no length.
func conformanceOrigin(t *testing.T, b sourcetest.Blobs, honourRange bool) sourcetest.Fixture {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		k := blob.Key(strings.TrimPrefix(r.URL.Path, "/blobs/"))
		if k == b.Slow {
			if honourRange {
				var start int64
				fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-", &start)
				w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, sourcetest.SlowSize-1, sourcetest.SlowSize))
				w.WriteHeader(http.StatusPartialContent)
			}
			trickle(w, r)
			return
		}
		data, ok := b.Data[k]
		if !ok {
			http.NotFound(w, r)
			return
		}
		if honourRange {
			http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
			return
		}
		w.(http.Flusher).Flush() // no Content-Length: the size is unknown
		w.Write(data)
	}))
	c := NewClient(Options{Backoff: time.Millisecond})
	t.Cleanup(func() {
		c.HTTPClient().CloseIdleConnections()
		srv.Close()
	})
	return sourcetest.Fixture{Source: func(k blob.Key) blob.Source {
		u, err := url.Parse(srv.URL + "/blobs/" + string(k))
		if err != nil {
			t.Fatal(err)
		}
		return c.Source(u, nil, nil)
	}}
}

func TestSourceConformance(t *testing.T) {
	t.Run("RangeOrigin", func(t *testing.T) {
		sourcetest.Run(t, sourcetest.Options{}, func(t *testing.T, b sourcetest.Blobs) sourcetest.Fixture {
			return conformanceOrigin(t, b, true)
		})
	})
	t.Run("WholeBodyOrigin", func(t *testing.T) {
		sourcetest.Run(t, sourcetest.Options{SizeMayBeUnknown: true}, func(t *testing.T, b sourcetest.Blobs) sourcetest.Fixture {
			return conformanceOrigin(t, b, false)
		})
	})
}
