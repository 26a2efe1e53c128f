package fusefs

import (
	"bytes"
	"os"
	"testing"
	"time"

	"github.com/peerd-project/peerd/transfer"
)

// A file read through the mount is one transfer, recorded at release with
// where its bytes came from.
func TestMountRecordsTransfers(t *testing.T) {
	log := transfer.NewLog(10)
	m := mountForTest(t, func(o *Options) { o.Transfers = log; o.DisablePassthrough = true })
	data := randomBytes(11, 3*testChunk+5)
	k := m.src.add(data)
	got, err := os.ReadFile(m.path(k)) // opens, reads, releases
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read: %v (equal %v)", err, bytes.Equal(got, data))
	}
	var recs []transfer.Record
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if recs = log.List(); len(recs) > 0 {
			break
		}
	}
	if len(recs) != 1 {
		t.Fatalf("%d transfers after one read, want 1: %+v", len(recs), recs)
	}
	r := recs[0]
	if r.Face != transfer.FaceFUSE || r.Key != string(k) || r.Result != "ok" || r.Bytes.Peers != int64(len(data)) || r.Bytes.Total() != int64(len(data)) {
		t.Fatalf("record %+v, want %d bytes from peers", r, len(data))
	}
}
