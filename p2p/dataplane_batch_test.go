package p2p

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
)

// recConn records every write that reaches the "socket".
type recConn struct {
	net.Conn
	mu     sync.Mutex
	writes [][]byte
	fail   error
}

func (c *recConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fail != nil {
		return 0, c.fail
	}
	c.writes = append(c.writes, append([]byte(nil), p...))
	return len(p), nil
}

func (c *recConn) joined() ([]byte, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Join(c.writes, nil), len(c.writes)
}

func TestBatchConnGathersOnlyWhileStarted(t *testing.T) {
	rc := &recConn{}
	bc := &batchConn{Conn: rc}
	bc.Write([]byte("handshake"))
	if _, n := rc.joined(); n != 1 {
		t.Fatalf("a write outside a transfer was held back (%d writes)", n)
	}
	bc.start()
	var want bytes.Buffer
	want.WriteString("handshake")
	for i := 0; i < 4; i++ {
		rec := bytes.Repeat([]byte{byte('a' + i)}, 16<<10+22)
		want.Write(rec)
		bc.Write(rec)
	}
	if _, n := rc.joined(); n != 1 {
		t.Fatalf("records reached the socket before flush (%d writes)", n)
	}
	if err := bc.flush(); err != nil {
		t.Fatal(err)
	}
	got, n := rc.joined()
	if n != 2 || !bytes.Equal(got, want.Bytes()) {
		t.Fatalf("after flush: %d writes, bytes equal %v; want 2 writes, the records in order", n, bytes.Equal(got, want.Bytes()))
	}
	// More than a batch holds: what was gathered goes first, in order.
	small := []byte("tail of the previous write")
	big := make([]byte, sendBufSize+batchSlack+1)
	rand.Read(big)
	bc.Write(small)
	bc.Write(big)
	want.Write(small)
	want.Write(big)
	if err := bc.stop(); err != nil {
		t.Fatal(err)
	}
	bc.Write([]byte("alert"))
	want.WriteString("alert")
	if got, _ := rc.joined(); !bytes.Equal(got, want.Bytes()) {
		t.Fatal("bytes reached the socket out of order or were lost")
	}
	if bc.buf != nil {
		t.Fatal("stop left the connection batching")
	}
}

func TestBatchConnReportsASocketError(t *testing.T) {
	broken := errors.New("connection reset")
	rc := &recConn{fail: broken}
	bc := &batchConn{Conn: rc}
	bc.start()
	if _, err := bc.Write([]byte("x")); err != nil {
		t.Fatalf("a gathered write failed early: %v", err)
	}
	if err := bc.flush(); !errors.Is(err, broken) {
		t.Fatalf("flush: %v, want the socket's error", err)
	}
	if err := bc.stop(); err != nil {
		t.Fatalf("stop after a failed flush: %v (nothing left to send)", err)
	}
}

// copyBatched sends a body larger than its buffer whole and in order, in
// about one socket write per buffer instead of one per TLS record.
func TestCopyBatchedSendsEverything(t *testing.T) {
	data := make([]byte, 5*sendBufSize+777)
	rand.Read(data)
	rc := &recConn{}
	bc := &batchConn{Conn: rc}
	// recordWriter stands in for tls.Conn: 16 KiB records, one write each.
	w := writerFunc(func(p []byte) (int, error) {
		for q := p; len(q) > 0; {
			m := min(len(q), 16<<10)
			if _, err := bc.Write(q[:m]); err != nil {
				return len(p) - len(q), err
			}
			q = q[m:]
		}
		return len(p), nil
	})
	n, err := copyBatched(w, bytes.NewReader(data), bc, nil)
	if err != nil || n != int64(len(data)) {
		t.Fatalf("copied %d, err %v; want %d", n, err, len(data))
	}
	got, writes := rc.joined()
	if !bytes.Equal(got, data) {
		t.Fatal("bytes differ")
	}
	if writes > 6 {
		t.Fatalf("%d socket writes for %d bytes; want one per %d-byte buffer", writes, len(data), sendBufSize)
	}
	if bc.buf != nil {
		t.Fatal("copyBatched left the connection batching")
	}
	// Without a batching connection it copies all the same, and tells
	// every byte it sent as it goes.
	var out bytes.Buffer
	var counted int64
	if n, err := copyBatched(&out, io.LimitReader(bytes.NewReader(data), 100000), nil, func(b int64) { counted += b }); err != nil || n != 100000 || counted != 100000 || !bytes.Equal(out.Bytes(), data[:100000]) {
		t.Fatalf("unbatched copy: n=%d counted=%d err=%v", n, counted, err)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
