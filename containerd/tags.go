package containerd

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/peerd-project/peerd/blob"
)

// ImageTag is what an image name points to in containerd's image store.
type ImageTag struct {
	Target ocispec.Descriptor
	// Updated is when containerd last set the name (a pull or a retag).
	Updated time.Time
}

// ResolveTag is Resolve with the time containerd last set the name, so that
// peers holding different images for one tag can prefer the newest.
func (s *Store) ResolveTag(ctx context.Context, name string) (ImageTag, error) {
	be := s.backend()
	if be == nil {
		return ImageTag{}, fmt.Errorf("containerd: image %s: not connected: %w", name, blob.ErrNotFound)
	}
	ctx, cancel := context.WithTimeout(s.ctx(ctx), rpcTimeout)
	defer cancel()
	img, err := be.Images.Get(ctx, name)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return ImageTag{}, fmt.Errorf("containerd: image %s: %w", name, blob.ErrNotFound)
		}
		return ImageTag{}, fmt.Errorf("containerd: image %s: %w", name, err)
	}
	if _, err := blob.ParseDigest(img.Target.Digest.String()); err != nil {
		return ImageTag{}, fmt.Errorf("containerd: image %s targets %q: %w", name, img.Target.Digest, blob.ErrNotFound)
	}
	// A tag whose manifest was garbage-collected or never fully pulled
	// cannot be served by digest: don't hand it to peers.
	if !s.Has(blob.Key(img.Target.Digest)) {
		if _, err := be.Content.Info(ctx, img.Target.Digest); err != nil {
			return ImageTag{}, fmt.Errorf("containerd: image %s: manifest %s not in the content store: %w", name, img.Target.Digest, blob.ErrNotFound)
		}
	}
	return ImageTag{Target: img.Target, Updated: img.UpdatedAt}, nil
}

// TagNames lists the image names that are tags ("<registry>/<repo>:<tag>";
// not digest-pinned names nor image IDs), sorted.
func (s *Store) TagNames(ctx context.Context) ([]string, error) {
	be := s.backend()
	if be == nil {
		return nil, fmt.Errorf("containerd: not connected")
	}
	ctx, cancel := context.WithTimeout(s.ctx(ctx), rpcTimeout)
	defer cancel()
	imgs, err := be.Images.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list containerd images: %w", err)
	}
	var out []string
	for _, img := range imgs {
		if isTagName(img.Name) {
			out = append(out, img.Name)
		}
	}
	slices.Sort(out)
	return out, nil
}

// isTagName: a "/" before a ":" that ends the name, and no digest pin.
func isTagName(name string) bool {
	if strings.Contains(name, "@") {
		return false
	}
	slash := strings.IndexByte(name, '/')
	colon := strings.LastIndexByte(name, ':')
	return slash > 0 && colon > slash && colon < len(name)-1 && !strings.Contains(name[colon:], "/")
}

// WatchTags calls fn with the store's tag names whenever they change,
// checking every interval, until ctx ends; then (and while containerd is
// unreachable) with none, so nothing is advertised that cannot be answered.
// Retagging an existing name changes nothing here: peers are answered from
// the image store at the time they ask.
func (s *Store) WatchTags(ctx context.Context, every time.Duration, fn func(names []string)) {
	var last []string
	known := false
	tick := time.NewTicker(every)
	defer tick.Stop()
	defer fn(nil)
	for {
		names, err := s.TagNames(ctx)
		if err != nil {
			names = nil
			if ctx.Err() == nil && s.Connected() {
				// A failed call on a live connection says nothing about
				// the tags: keep what was advertised.
				s.log.Debug("list image tags", "err", err)
				names = last
			}
		}
		if !known || !slices.Equal(names, last) {
			if known {
				s.log.Info("image tags changed", "tags", len(names), "before", len(last))
			}
			fn(names)
			last, known = names, true
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}
