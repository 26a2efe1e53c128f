package containerd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/peerd-project/peerd/blob"
	"github.com/prometheus/client_golang/prometheus"
)

// fakeContent is an in-memory content store.
type fakeContent struct {
	mu     sync.Mutex
	blobs  map[digest.Digest][]byte
	labels map[digest.Digest]map[string]string
	reads  int
	stall  bool // readers never answer until their context ends (a stuck containerd)
}

func newFakeContent() *fakeContent {
	return &fakeContent{blobs: map[digest.Digest][]byte{}, labels: map[digest.Digest]map[string]string{}}
}

func (f *fakeContent) add(b []byte, labels map[string]string) digest.Digest {
	d := digest.FromBytes(b)
	f.mu.Lock()
	f.blobs[d] = b
	f.labels[d] = labels
	f.mu.Unlock()
	return d
}

func (f *fakeContent) del(d digest.Digest) {
	f.mu.Lock()
	delete(f.blobs, d)
	f.mu.Unlock()
}

func (f *fakeContent) Info(ctx context.Context, d digest.Digest) (content.Info, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	b, ok := f.blobs[d]
	if !ok {
		return content.Info{}, fmt.Errorf("content %s: %w", d, errdefs.ErrNotFound)
	}
	return content.Info{Digest: d, Size: int64(len(b)), Labels: f.labels[d]}, nil
}

type bytesReaderAt struct{ *bytes.Reader }

func (bytesReaderAt) Close() error { return nil }

func (f *fakeContent) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	b, ok := f.blobs[desc.Digest]
	if !ok {
		return nil, fmt.Errorf("content %s: %w", desc.Digest, errdefs.ErrNotFound)
	}
	f.reads++
	if f.stall {
		return stalledReaderAt{ctx: ctx, size: int64(len(b))}, nil
	}
	return bytesReaderAt{bytes.NewReader(b)}, nil
}

// stalledReaderAt is containerd's proxy reader when containerd stops
// answering: each read waits on the context the reader was opened with.
type stalledReaderAt struct {
	ctx  context.Context
	size int64
}

func (r stalledReaderAt) ReadAt(p []byte, off int64) (int, error) {
	<-r.ctx.Done()
	return 0, r.ctx.Err()
}
func (r stalledReaderAt) Size() int64  { return r.size }
func (r stalledReaderAt) Close() error { return nil }

func (f *fakeContent) Walk(ctx context.Context, fn content.WalkFunc, filters ...string) error {
	f.mu.Lock()
	var infos []content.Info
	for d, b := range f.blobs {
		infos = append(infos, content.Info{Digest: d, Size: int64(len(b)), Labels: f.labels[d]})
	}
	f.mu.Unlock()
	for _, i := range infos {
		if err := fn(i); err != nil {
			return err
		}
	}
	return nil
}

type fakeImages struct {
	mu   sync.Mutex
	imgs map[string]images.Image
}

func (f *fakeImages) Get(ctx context.Context, name string) (images.Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	img, ok := f.imgs[name]
	if !ok {
		return images.Image{}, fmt.Errorf("image %s: %w", name, errdefs.ErrNotFound)
	}
	return img, nil
}

func (f *fakeImages) List(ctx context.Context, filters ...string) ([]images.Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []images.Image
	for _, i := range f.imgs {
		out = append(out, i)
	}
	return out, nil
}

// fakeEvents hands out one stream per Subscribe; closing it with an error
// looks like containerd going away.
type fakeEvents struct {
	mu   sync.Mutex
	subs []chan *events.Envelope
	errs []chan error
	subd chan struct{}
}

func (f *fakeEvents) Subscribe(ctx context.Context, filters ...string) (<-chan *events.Envelope, <-chan error) {
	ch := make(chan *events.Envelope, 16)
	errc := make(chan error, 1)
	f.mu.Lock()
	f.subs = append(f.subs, ch)
	f.errs = append(f.errs, errc)
	f.mu.Unlock()
	select {
	case f.subd <- struct{}{}:
	default:
	}
	return ch, errc
}

func (f *fakeEvents) send(t *testing.T, ns, topic string, ev any) {
	t.Helper()
	a, err := typeurl.MarshalAny(ev)
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	ch := f.subs[len(f.subs)-1]
	f.mu.Unlock()
	ch <- &events.Envelope{Namespace: ns, Topic: topic, Event: a}
}

func (f *fakeEvents) fail() {
	f.mu.Lock()
	errc := f.errs[len(f.errs)-1]
	f.mu.Unlock()
	errc <- errors.New("connection reset")
}

// recorder is a fake blob.Announcer.
type recorder struct {
	mu  sync.Mutex
	set map[blob.Key]bool
	ch  chan struct{}
}

func newRecorder() *recorder {
	return &recorder{set: map[blob.Key]bool{}, ch: make(chan struct{}, 100)}
}

func (r *recorder) Holding(keys ...blob.Key) {
	r.mu.Lock()
	for _, k := range keys {
		r.set[k] = true
	}
	r.mu.Unlock()
	r.ch <- struct{}{}
}

func (r *recorder) Dropped(keys ...blob.Key) {
	r.mu.Lock()
	for _, k := range keys {
		delete(r.set, k)
	}
	r.mu.Unlock()
	r.ch <- struct{}{}
}

func (r *recorder) keys() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for k := range r.set {
		out = append(out, string(k))
	}
	sort.Strings(out)
	return out
}

// waitFor polls cond until it holds; the deadline only bounds a hang.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type fixture struct {
	content *fakeContent
	images  *fakeImages
	events  *fakeEvents
	adv     *recorder
	store   *Store
	cancel  context.CancelFunc
	done    chan struct{}

	mu       sync.Mutex
	connects int
	failNext int
	synced   chan struct{}
}

// image builds a one-platform image of two layers in the fake store and
// returns the manifest, config and layer digests.
func (fx *fixture) image(name string, layers ...[]byte) (ocispec.Descriptor, []digest.Digest) {
	src := map[string]string{SourceLabelPrefix + "registry.example": "team/app"}
	cfg := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	cd := fx.content.add(cfg, src)
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest,
		Config: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: cd, Size: int64(len(cfg))}}
	m.SchemaVersion = 2
	ds := []digest.Digest{cd}
	for _, l := range layers {
		ld := fx.content.add(l, src)
		ds = append(ds, ld)
		m.Layers = append(m.Layers, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: ld, Size: int64(len(l))})
	}
	mb, _ := json.Marshal(m)
	md := fx.content.add(mb, src)
	target := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: md, Size: int64(len(mb))}
	fx.images.mu.Lock()
	fx.images.imgs[name] = images.Image{Name: name, Target: target}
	fx.images.mu.Unlock()
	return target, append([]digest.Digest{md}, ds...)
}

func newFixture(t *testing.T) *fixture {
	fx := &fixture{
		content: newFakeContent(),
		images:  &fakeImages{imgs: map[string]images.Image{}},
		events:  &fakeEvents{subd: make(chan struct{}, 10)},
		adv:     newRecorder(),
		done:    make(chan struct{}),
		synced:  make(chan struct{}, 100),
	}
	fx.store = New(Options{
		OnSync: func(string) {
			select {
			case fx.synced <- struct{}{}:
			default:
			}
		},
		Namespace:  "k8s.io",
		Announcer:  fx.adv,
		Resync:     50 * time.Millisecond,
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		Registerer: prometheus.NewRegistry(),
		Connect: func(ctx context.Context) (*Backend, error) {
			fx.mu.Lock()
			defer fx.mu.Unlock()
			fx.connects++
			if fx.failNext > 0 {
				fx.failNext--
				return nil, errors.New("dial unix: connection refused")
			}
			return &Backend{Content: fx.content, Images: fx.images, Events: fx.events}, nil
		},
	})
	return fx
}

func (fx *fixture) start(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	fx.cancel = cancel
	go func() { defer close(fx.done); fx.store.Run(ctx) }()
	t.Cleanup(fx.stop)
}

func (fx *fixture) stop() {
	fx.cancel()
	<-fx.done
}

func keysOf(ds ...digest.Digest) []string {
	var out []string
	for _, d := range ds {
		out = append(out, d.String())
	}
	sort.Strings(out)
	return out
}

func equal(a, b []string) bool {
	return fmt.Sprint(a) == fmt.Sprint(b)
}

func TestResyncAdvertisesEveryBlobAndLearnsMediaTypes(t *testing.T) {
	fx := newFixture(t)
	_, ds := fx.image("registry.example/team/app:v1", []byte("layer one"), []byte("layer two"))
	fx.start(t)
	want := keysOf(ds...)
	waitFor(t, "advertised blobs", func() bool { return equal(fx.adv.keys(), want) })
	if !fx.store.Connected() {
		t.Fatal("store not connected after resync")
	}
	if mt := fx.store.MediaType(blob.Key(ds[0])); mt != ocispec.MediaTypeImageManifest {
		t.Fatalf("manifest media type = %q", mt)
	}
	if mt := fx.store.MediaType(blob.Key(ds[2])); mt != ocispec.MediaTypeImageLayerGzip {
		t.Fatalf("layer media type = %q", mt)
	}
}

func TestEventsAdvertiseAndWithdraw(t *testing.T) {
	fx := newFixture(t)
	fx.start(t)
	<-fx.events.subd
	waitFor(t, "connected", fx.store.Connected)

	// 2.x: a committed blob is announced at once.
	d := fx.content.add([]byte("fresh layer"), nil)
	fx.events.send(t, "k8s.io", "/content/create", &eventstypes.ContentCreate{Digest: d.String(), Size: 11})
	waitFor(t, "content create advertised", func() bool { return equal(fx.adv.keys(), keysOf(d)) })

	// Another namespace's events are not ours.
	other := fx.content.add([]byte("other ns"), nil)
	fx.events.send(t, "moby", "/content/create", &eventstypes.ContentCreate{Digest: other.String(), Size: 8})

	// 1.x: image events find what a pull committed.
	_, ds := fx.image("registry.example/team/app:v2", []byte("l1"))
	fx.events.send(t, "k8s.io", "/images/create", &eventstypes.ImageCreate{Name: "registry.example/team/app:v2"})
	want := keysOf(append(ds, d)...)
	waitFor(t, "image create advertised", func() bool { return equal(fx.adv.keys(), want) })
	if fx.store.Has(blob.Key(other)) {
		t.Fatal("advertised a blob from an event of another namespace")
	}

	fx.content.del(d)
	fx.events.send(t, "k8s.io", "/content/delete", &eventstypes.ContentDelete{Digest: d.String()})
	waitFor(t, "content delete withdrawn", func() bool { return equal(fx.adv.keys(), keysOf(ds...)) })
}

func TestGarbageCollectionCaughtByResync(t *testing.T) {
	fx := newFixture(t)
	_, ds := fx.image("registry.example/team/app:v1", []byte("gc me"))
	fx.start(t)
	waitFor(t, "advertised", func() bool { return len(fx.adv.keys()) == len(ds) })
	// GC deletes content without a /content/delete event.
	fx.content.del(ds[2])
	fx.store.Resync()
	waitFor(t, "gc'd blob withdrawn", func() bool { return !fx.store.Has(blob.Key(ds[2])) && len(fx.adv.keys()) == len(ds)-1 })
}

func TestReconnectAfterContainerdRestart(t *testing.T) {
	fx := newFixture(t)
	fx.failNext = 1 // socket not there yet
	_, ds := fx.image("registry.example/team/app:v1", []byte("x"))
	fx.start(t)
	waitFor(t, "first advertise", func() bool { return len(fx.adv.keys()) == len(ds) })
	// containerd restarts; meanwhile a blob was added.
	d := fx.content.add([]byte("committed while away"), nil)
	fx.events.fail()
	waitFor(t, "resync after reconnect", func() bool { return fx.store.Has(blob.Key(d)) })
	fx.mu.Lock()
	n := fx.connects
	fx.mu.Unlock()
	if n < 3 {
		t.Fatalf("connects = %d, want a failed one, a first and a reconnect", n)
	}
	fx.stop()
	if k := fx.adv.keys(); len(k) != 0 {
		t.Fatalf("still advertised after Run returned: %v", k)
	}
}

func TestOpenLocal(t *testing.T) {
	fx := newFixture(t)
	layer := bytes.Repeat([]byte("0123456789"), 300_000) // 3 MB: several ReadSize reads
	_, ds := fx.image("registry.example/team/app:v1", layer)
	fx.start(t)
	waitFor(t, "advertised", func() bool { return len(fx.adv.keys()) == len(ds) })
	k := blob.Key(ds[2])

	rc, size, err := fx.store.OpenLocal(k, 5, 2_000_000)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || size != int64(len(layer)) || !bytes.Equal(got, layer[5:2_000_005]) {
		t.Fatalf("range read: size %d err %v, %d bytes, equal %v", size, err, len(got), bytes.Equal(got, layer[5:2_000_005]))
	}
	rc, _, err = fx.store.OpenLocal(k, int64(len(layer))-3, -1)
	if err != nil {
		t.Fatal(err)
	}
	got, _ = io.ReadAll(rc)
	rc.Close()
	if string(got) != "789" {
		t.Fatalf("tail read %q", got)
	}
	if _, _, err := fx.store.OpenLocal(k, int64(len(layer))+1, 1); err == nil {
		t.Fatal("read past the end succeeded")
	}

	// Unknown: answered from the index without asking containerd.
	fx.content.mu.Lock()
	before := fx.content.reads
	fx.content.mu.Unlock()
	unknown := blob.Key(digest.FromString("nope"))
	if _, _, err := fx.store.OpenLocal(unknown, 0, -1); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("unknown blob: %v", err)
	}
	if _, _, err := fx.store.OpenLocal("url:"+blob.Key(ds[2].Encoded()), 0, -1); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("url key: %v", err)
	}
	fx.content.mu.Lock()
	after := fx.content.reads
	fx.content.mu.Unlock()
	if after != before {
		t.Fatal("an unknown blob cost a containerd call")
	}

	// Deleted behind our back: not found, and withdrawn.
	fx.content.del(ds[2])
	if _, _, err := fx.store.OpenLocal(k, 0, -1); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("deleted blob: %v", err)
	}
	if fx.store.Has(k) {
		t.Fatal("deleted blob still indexed")
	}
}

func TestResolve(t *testing.T) {
	fx := newFixture(t)
	target, _ := fx.image("registry.example/team/app:v1", []byte("x"))
	fx.start(t)
	waitFor(t, "connected", fx.store.Connected)
	got, err := fx.store.Resolve(context.Background(), "registry.example/team/app:v1")
	if err != nil || got.Digest != target.Digest || got.MediaType != target.MediaType {
		t.Fatalf("resolve = %+v, %v", got, err)
	}
	if _, err := fx.store.Resolve(context.Background(), "registry.example/team/app:v9"); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("unknown tag: %v", err)
	}
}

func (fx *fixture) drain() {
	for {
		select {
		case <-fx.synced:
		default:
			return
		}
	}
}

func (fx *fixture) reads() int {
	fx.content.mu.Lock()
	defer fx.content.mu.Unlock()
	return fx.content.reads
}

func TestResyncSkipsUnchangedImages(t *testing.T) {
	fx := newFixture(t)
	fx.image("registry.example/team/app:v1", []byte("x"))
	fx.start(t)
	<-fx.synced
	fx.drain()
	<-fx.synced // a periodic resync after the first one
	before := fx.reads()
	fx.drain()
	<-fx.synced
	<-fx.synced
	if after := fx.reads(); after != before {
		t.Fatalf("periodic resyncs read %d manifests of an unchanged image", after-before)
	}
	// A retagged image is walked again.
	_, ds := fx.image("registry.example/team/app:v1", []byte("y"))
	waitFor(t, "new target walked", func() bool {
		return fx.store.MediaType(blob.Key(ds[0])) == ocispec.MediaTypeImageManifest
	})
}

func TestSourceFetch(t *testing.T) {
	fx := newFixture(t)
	layer := bytes.Repeat([]byte("abcdefgh"), 1000)
	_, ds := fx.image("registry.example/team/app:v1", layer)
	fx.start(t)
	<-fx.synced
	src := fx.store.Source()
	if src.Name() != "containerd" {
		t.Fatalf("source named %s", src.Name())
	}
	rc, size, err := src.Fetch(context.Background(), blob.Key(ds[2]), 7990, 100)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(rc)
	rc.Close()
	if size != 8000 || string(got) != "ghabcdefgh" {
		t.Fatalf("fetch past the end: size %d, %q", size, got)
	}
	if _, _, err := src.Fetch(context.Background(), blob.Key(digest.FromString("absent")), 0, 10); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("absent: %v", err)
	}
	if _, _, err := src.Fetch(context.Background(), blob.Key(ds[2]), 9000, 10); !errors.Is(err, blob.ErrNotFound) {
		t.Fatalf("offset past the end: %v", err)
	}
}

// countHandler counts log records by level.
type countHandler struct {
	mu    sync.Mutex
	warns int
}

func (h *countHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Level == slog.LevelWarn {
		h.mu.Lock()
		h.warns++
		h.mu.Unlock()
	}
	return nil
}
func (h *countHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countHandler) WithGroup(string) slog.Handler      { return h }

func TestAbsentContainerdLoggedOnce(t *testing.T) {
	fx := newFixture(t)
	logs := &countHandler{}
	fx.store.log = slog.New(logs)
	fx.failNext = 3 // three attempts find no socket, then containerd appears
	fx.start(t)
	waitFor(t, "connected after the socket appeared", fx.store.Connected)
	logs.mu.Lock()
	warns := logs.warns
	logs.mu.Unlock()
	if warns != 1 {
		t.Fatalf("%d warnings for one absent containerd, want 1", warns)
	}
}

// A containerd that stops answering mid-read does not hold a reader
// forever: one read gives up after readTimeout, and a cache fill's reads end
// with the fill's context.
func TestStalledContainerdReadsEnd(t *testing.T) {
	fx := newFixture(t)
	layer := bytes.Repeat([]byte("abcdefgh"), 1000)
	_, ds := fx.image("registry.example/team/app:v1", layer)
	fx.start(t)
	<-fx.synced
	k := blob.Key(ds[2])
	fx.content.mu.Lock()
	fx.content.stall = true
	fx.content.mu.Unlock()
	readAll := func(rc io.ReadCloser) <-chan error {
		done := make(chan error, 1)
		go func() {
			_, err := io.ReadAll(rc)
			rc.Close()
			done <- err
		}()
		return done
	}
	wait := func(what string, done <-chan error) error {
		t.Helper()
		select {
		case err := <-done:
			if err == nil {
				t.Fatalf("%s: a stalled read returned no error", what)
			}
			return err
		case <-time.After(time.Minute):
			t.Fatalf("%s: the read still hangs after a minute", what)
			return nil
		}
	}

	// A peer's request (OpenLocal): bounded by readTimeout.
	old := readTimeout
	readTimeout = 50 * time.Millisecond
	t.Cleanup(func() { readTimeout = old })
	rc, _, err := fx.store.OpenLocal(k, 0, -1)
	if err != nil {
		t.Fatal(err)
	}
	if err := wait("OpenLocal", readAll(rc)); !strings.Contains(err.Error(), "gave nothing in") {
		t.Fatalf("OpenLocal: %v, want the read timeout named", err)
	}

	// A cache fill (Source().Fetch): its context ends the read first.
	readTimeout = time.Hour
	ctx, cancel := context.WithCancel(context.Background())
	rc, _, err = fx.store.Source().Fetch(ctx, k, 0, -1)
	if err != nil {
		t.Fatal(err)
	}
	done := readAll(rc)
	cancel()
	if err := wait("Fetch", done); !errors.Is(err, context.Canceled) {
		t.Fatalf("Fetch after its context ended: %v", err)
	}
}
