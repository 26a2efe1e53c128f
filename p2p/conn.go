package p2p

import (
	"io"
	"net"
	"sync"
)

// sendBufSize is the plaintext one write of a peer transfer hands to TLS.
// A transfer holds one such copy buffer and, on its connection, one batch
// of the records it becomes (sendBufSize + batchSlack): at most maxServes
// transfers at once hold 128 * 132 KiB ~ 16.5 MiB; idle buffers are pooled
// and go with the next GCs.
const sendBufSize = 64 << 10

// batchSlack covers the TLS 1.3 overhead of the records one write becomes
// (5 header + 1 type + 16 tag bytes per 16 KiB record).
const batchSlack = 1 << 10

var (
	sendBufPool  = sync.Pool{New: func() any { b := make([]byte, sendBufSize); return &b }}
	batchBufPool = sync.Pool{New: func() any { b := make([]byte, 0, sendBufSize+batchSlack); return &b }}
)

// copyBatched copies a transfer's body to w. Neither io.Copy shortcut
// applies (sendfile cannot cross TLS), so io.Copy would move the bytes in
// 32 KiB reads; this reads sendBufSize at a time and, when the connection
// batches (bc != nil), sends the TLS records each write becomes in one
// write(2) instead of one per 16 KiB record. sent (when non-nil) is told
// each write's bytes as they go, so counters follow a long transfer instead
// of jumping at its end.
func copyBatched(w io.Writer, r io.Reader, bc *batchConn, sent func(int64)) (int64, error) {
	bp := sendBufPool.Get().(*[]byte)
	defer sendBufPool.Put(bp)
	buf := *bp
	if bc != nil {
		bc.start()
		defer bc.stop()
	}
	var written int64
	for {
		m, rerr := r.Read(buf)
		if m > 0 {
			k, err := w.Write(buf[:m])
			written += int64(k)
			if sent != nil && k > 0 {
				sent(int64(k))
			}
			if err == nil && bc != nil {
				err = bc.flush()
			}
			if err != nil {
				return written, err
			}
		}
		if rerr == io.EOF {
			return written, nil
		}
		if rerr != nil {
			return written, rerr
		}
	}
}

// batchListener hands out connections that can batch writes.
type batchListener struct{ net.Listener }

func (l batchListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &batchConn{Conn: c}, nil
}

// batchConn is the TCP connection under a peer's TLS server connection.
// crypto/tls writes every record (16 KiB at most) with its own write(2),
// and on loopback each costs a trip through the whole TCP stack on both
// ends. Between start and stop (one transfer's body) writes are gathered
// and sent at flush; everything else (handshake, headers of other
// responses, alerts) passes straight through. net/http serves one request
// at a time per connection, and the mutex orders the rare write from the
// TLS read side (a key update) with the handler's.
type batchConn struct {
	net.Conn
	mu  sync.Mutex
	buf *[]byte // non-nil while batching
}

func (c *batchConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.buf == nil {
		return c.Conn.Write(p)
	}
	b := *c.buf
	if len(b)+len(p) > cap(b) {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
		b = *c.buf
		if len(p) > cap(b) {
			return c.Conn.Write(p)
		}
	}
	*c.buf = append(b, p...)
	return len(p), nil
}

func (c *batchConn) flushLocked() error {
	if c.buf == nil || len(*c.buf) == 0 {
		return nil
	}
	// net.Conn.Write writes everything or returns an error.
	_, err := c.Conn.Write(*c.buf)
	*c.buf = (*c.buf)[:0]
	return err
}

func (c *batchConn) start() {
	c.mu.Lock()
	if c.buf == nil {
		c.buf = batchBufPool.Get().(*[]byte)
		*c.buf = (*c.buf)[:0]
	}
	c.mu.Unlock()
}

// flush sends what was gathered.
func (c *batchConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.flushLocked()
}

// stop sends what was gathered and ends batching. Bytes it could not send
// (the connection broke) are dropped with the connection's error: the
// asker sees a short body and resumes elsewhere.
func (c *batchConn) stop() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	err := c.flushLocked()
	if c.buf != nil {
		batchBufPool.Put(c.buf)
		c.buf = nil
	}
	return err
}
