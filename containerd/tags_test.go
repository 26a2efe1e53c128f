package containerd

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/peerd-project/peerd/blob"
)

func TestIsTagName(t *testing.T) {
	for name, want := range map[string]bool{
		"docker.io/library/alpine:3.20": true,
		"127.0.0.1:5000/team/app:v1":    true,
		"127.0.0.1:5000/team/app":       false, // the colon is the port
		"docker.io/library/alpine":      false,
		"docker.io/library/alpine@sha256:" + "0000000000000000000000000000000000000000000000000000000000000000": false,
		"docker.io/library/alpine:3@sha256:0000000000000000000000000000000000000000000000000000000000000000":    false,
		"sha256:0000000000000000000000000000000000000000000000000000000000000000":                               false,
		"docker.io/a:":  false,
		"alpine:latest": false, // containerd names always carry the registry
	} {
		if got := isTagName(name); got != want {
			t.Errorf("isTagName(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestResolveTagAndWatchTags(t *testing.T) {
	fx := newFixture(t)
	target, _ := fx.image("registry.example/team/app:v1")
	fx.images.mu.Lock()
	img := fx.images.imgs["registry.example/team/app:v1"]
	img.UpdatedAt = time.Unix(1700000000, 0)
	fx.images.imgs[img.Name] = img
	// A digest-pinned name and an image ID are not tags.
	fx.images.imgs["registry.example/team/app@"+target.Digest.String()] = images.Image{Name: "registry.example/team/app@" + target.Digest.String(), Target: target}
	fx.images.imgs[target.Digest.String()] = images.Image{Name: target.Digest.String(), Target: target}
	fx.images.mu.Unlock()

	if _, err := fx.store.ResolveTag(context.Background(), "registry.example/team/app:v1"); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("before connecting: %v, want ErrNotFound", err)
	}
	var mu sync.Mutex
	var seen [][]string
	got := func() [][]string {
		mu.Lock()
		defer mu.Unlock()
		return append([][]string(nil), seen...)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		fx.store.WatchTags(ctx, 10*time.Millisecond, func(names []string) {
			mu.Lock()
			seen = append(seen, names)
			mu.Unlock()
		})
	}()
	fx.start(t)
	waitFor(t, "the tag is listed", func() bool {
		s := got()
		return len(s) > 0 && equal(s[len(s)-1], []string{"registry.example/team/app:v1"})
	})

	it, err := fx.store.ResolveTag(context.Background(), "registry.example/team/app:v1")
	if err != nil || it.Target.Digest != target.Digest || !it.Updated.Equal(time.Unix(1700000000, 0)) {
		t.Fatalf("ResolveTag = %+v, %v", it, err)
	}
	if _, err := fx.store.ResolveTag(context.Background(), "registry.example/team/app:v2"); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("unknown tag: %v, want ErrNotFound", err)
	}

	// A tag whose manifest is gone from the content store is not answered.
	fx.image("registry.example/team/other:v1")
	fx.images.mu.Lock()
	broken := fx.images.imgs["registry.example/team/other:v1"]
	fx.images.mu.Unlock()
	fx.content.del(broken.Target.Digest)
	fx.store.Resync()
	waitFor(t, "both tags listed", func() bool {
		s := got()
		return equal(s[len(s)-1], []string{"registry.example/team/app:v1", "registry.example/team/other:v1"})
	})
	waitFor(t, "the deleted manifest is forgotten", func() bool { return !fx.store.Has(blob.Key(broken.Target.Digest)) })
	if _, err := fx.store.ResolveTag(context.Background(), "registry.example/team/other:v1"); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("tag without its manifest: %v, want ErrNotFound", err)
	}

	// Deleting the image drops the tag; unchanged lists are not repeated.
	fx.images.mu.Lock()
	delete(fx.images.imgs, "registry.example/team/app:v1")
	fx.images.mu.Unlock()
	waitFor(t, "the tag is dropped", func() bool {
		s := got()
		return equal(s[len(s)-1], []string{"registry.example/team/other:v1"})
	})
	for i, s := range got()[1:] {
		if equal(s, got()[i]) {
			t.Fatalf("the same tag list was reported twice in a row: %v", s)
		}
	}

	// Stopping reports no tags: nothing stays advertised.
	cancel()
	<-done
	if s := got(); len(s[len(s)-1]) != 0 {
		t.Fatalf("after stop: %v, want none", s[len(s)-1])
	}
}
