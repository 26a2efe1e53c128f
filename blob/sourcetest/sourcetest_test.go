package sourcetest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"testing"

	"github.com/peerd-project/peerd/blob"
)

// memSource is the contract in a few lines: the reference the suite is
// checked against.
type memSource struct{ b Blobs }

func (memSource) Name() string { return "mem" }

func (m memSource) Fetch(ctx context.Context, k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	if k == m.b.Slow {
		return io.NopCloser(stalled{ctx}), SlowSize, nil
	}
	data, ok := m.b.Data[k]
	if !ok {
		return nil, -1, fmt.Errorf("%s: %w", k, blob.ErrNotFound)
	}
	size := int64(len(data))
	return io.NopCloser(bytes.NewReader(data[off:min(off+n, size)])), size, nil
}

// stalled never delivers a byte; it ends with its context.
type stalled struct{ ctx context.Context }

func (s stalled) Read([]byte) (int, error) { <-s.ctx.Done(); return 0, s.ctx.Err() }

type memLocal map[blob.Key][]byte

func (m memLocal) OpenLocal(k blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	data, ok := m[k]
	if !ok {
		return nil, -1, fmt.Errorf("%s: %w", k, blob.ErrNotFound)
	}
	size := int64(len(data))
	if n < 0 || n > size-off {
		n = size - off
	}
	return io.NopCloser(bytes.NewReader(data[off : off+n])), size, nil
}

func TestReference(t *testing.T) {
	Run(t, Options{}, func(t *testing.T, b Blobs) Fixture {
		src := memSource{b}
		return Fixture{Source: func(blob.Key) blob.Source { return src }}
	})
}

func TestReferenceLocal(t *testing.T) {
	RunLocal(t, LocalOptions{}, func(t *testing.T, blobs map[blob.Key][]byte) Local { return memLocal(blobs) })
}
