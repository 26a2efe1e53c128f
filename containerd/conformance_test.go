package containerd

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/blob/sourcetest"
	"github.com/prometheus/client_golang/prometheus"
)

// slowContent is the fake content store plus one blob (of size bytes) whose
// reads never answer until their context ends: a containerd stuck on its disk.
type slowContent struct {
	*fakeContent
	slow digest.Digest
	size int64
}

func (s slowContent) Info(ctx context.Context, d digest.Digest) (content.Info, error) {
	if d == s.slow {
		return content.Info{Digest: d, Size: s.size}, nil
	}
	return s.fakeContent.Info(ctx, d)
}

func (s slowContent) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	if desc.Digest == s.slow {
		return stalledReaderAt{ctx: ctx, size: s.size}, nil
	}
	return s.fakeContent.ReaderAt(ctx, desc)
}

func (s slowContent) Walk(ctx context.Context, fn content.WalkFunc, filters ...string) error {
	if s.slow != "" {
		if err := fn(content.Info{Digest: s.slow, Size: s.size}); err != nil {
			return err
		}
	}
	return s.fakeContent.Walk(ctx, fn, filters...)
}

// conformanceStore is a running Store over the fake content store holding
// blobs (and slow, if not empty), with every blob indexed.
func conformanceStore(t *testing.T, blobs map[blob.Key][]byte, slow blob.Key) *Store {
	fc := newFakeContent()
	for _, b := range blobs {
		fc.add(b, nil)
	}
	cs := slowContent{fakeContent: fc, slow: digest.Digest(slow), size: sourcetest.SlowSize}
	st := New(Options{
		Namespace:  "k8s.io",
		Resync:     time.Hour,
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		Registerer: prometheus.NewRegistry(),
		Connect: func(ctx context.Context) (*Backend, error) {
			return &Backend{Content: cs, Images: &fakeImages{imgs: map[string]images.Image{}},
				Events: &fakeEvents{subd: make(chan struct{}, 1)}}, nil
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); st.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	waitFor(t, "every blob indexed", func() bool {
		for k := range blobs {
			if !st.Has(k) {
				return false
			}
		}
		return slow == "" || st.Has(slow)
	})
	return st
}

func TestSourceConformance(t *testing.T) {
	sourcetest.Run(t, sourcetest.Options{}, func(t *testing.T, b sourcetest.Blobs) sourcetest.Fixture {
		src := conformanceStore(t, b.Data, b.Slow).Source()
		return sourcetest.Fixture{Source: func(blob.Key) blob.Source { return src }}
	})
}

func TestLocalStoreConformance(t *testing.T) {
	sourcetest.RunLocal(t, sourcetest.LocalOptions{}, func(t *testing.T, blobs map[blob.Key][]byte) sourcetest.Local {
		return conformanceStore(t, blobs, "")
	})
}
