package httpmirror

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/transfer"
	"github.com/peerd-project/peerd/upstream"
)

// Every /blobs/ GET is recorded with where its bytes came from, and the
// record carries no query string (signatures) or header.
func TestBlobsTransfersRecordSourcesWithoutSecrets(t *testing.T) {
	const sig = "SECRETSIG"
	data := make([]byte, 300<<10+7)
	rand.Read(data)
	_, originURL := loopbackServer(t, "127.0.0.2", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
	}))
	c, err := cache.Open(cache.Options{Dir: t.TempDir(), ChunkSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	allow, _ := upstream.ParseAllowList([]string{"127.0.0.2"})
	log := transfer.NewLog(10)
	_, node := loopbackServer(t, "127.0.0.1", New(Config{Cache: c, Upstream: upstream.NewClient(upstream.Options{}), Allow: allow, Transfers: log}))
	u := node + "/blobs/" + originURL + "/layer.tar?X-Amz-Signature=" + sig
	for i, hdr := range [][]string{nil, nil, {"Range", "bytes=100-1099"}} {
		resp, body, _ := getWithin(t, u, 30*time.Second, hdr...)
		if resp.StatusCode/100 != 2 {
			t.Fatalf("GET %d: %s %s", i, resp.Status, body)
		}
	}
	// The record is made as the handler returns, just after the body went out.
	var recs []transfer.Record
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if recs = log.List(); len(recs) == 3 {
			break
		}
	}
	if len(recs) != 3 {
		t.Fatalf("%d transfers recorded, want 3", len(recs))
	}
	size := int64(len(data))
	first, second, ranged := recs[2], recs[1], recs[0]
	if first.Face != transfer.FaceBlobs || first.Bytes != (transfer.Bytes{Origin: size}) || first.Status != 200 || first.Result != "ok" {
		t.Errorf("first GET: %+v, want %d bytes from the origin", first, size)
	}
	if second.Bytes != (transfer.Bytes{Cache: size}) {
		t.Errorf("second GET: %+v, want %d bytes from the cache", second.Bytes, size)
	}
	if ranged.Bytes != (transfer.Bytes{Cache: 1000}) || ranged.Status != http.StatusPartialContent {
		t.Errorf("range GET: %+v", ranged)
	}
	if !strings.HasSuffix(first.What, "/layer.tar") {
		t.Errorf("what %q, want the origin URL", first.What)
	}
	js, _ := json.Marshal(recs)
	if bytes.Contains(js, []byte(sig)) || bytes.Contains(js, []byte("?")) {
		t.Errorf("a record carries the query string: %s", js)
	}
}
