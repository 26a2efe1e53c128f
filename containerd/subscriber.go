package containerd

import (
	"context"
	"errors"
	"fmt"
	"strings"
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

const (
	backoffMin = 500 * time.Millisecond
	backoffMax = 30 * time.Second
	// gcSettle is how long after an image delete the store is walked again:
	// containerd's garbage collector deletes content without an event.
	gcSettle = 3 * time.Second
)

// Run connects to containerd, advertises what it holds, follows its events
// until ctx ends, and reconnects with backoff whenever containerd goes away.
// It withdraws everything it advertised before it returns.
func (s *Store) Run(ctx context.Context) error {
	defer s.disconnect(true)
	delay := backoffMin
	failing := false
	for {
		err := s.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			msg := err.Error()
			s.lastErr.Store(&msg)
		}
		connected := s.Connected()
		s.disconnect(false)
		if connected {
			// It worked for a while: start over quickly and say so once.
			delay = backoffMin
			failing = false
		}
		if !failing {
			s.log.Warn("containerd unavailable; retrying with backoff (other faces keep serving)", "socket", s.opts.Socket, "err", err)
			failing = true
		} else {
			s.log.Debug("containerd still unavailable", "socket", s.opts.Socket, "err", err, "retry-in", delay)
		}
		s.m.reconnects.Inc()
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		delay = min(delay*2, backoffMax)
	}
}

// session runs one connection: subscribe, resync, then follow events.
func (s *Store) session(ctx context.Context) error {
	be, err := s.opts.Connect(ctx)
	if err != nil {
		return err
	}
	sctx, cancel := context.WithCancel(s.ctx(ctx))
	defer cancel()
	s.walked = map[string]digest.Digest{}
	// Subscribe before the walk so nothing committed in between is missed.
	evs, errs := be.Events.Subscribe(sctx,
		fmt.Sprintf(`namespace==%q,topic~="^/images/"`, s.opts.Namespace),
		fmt.Sprintf(`namespace==%q,topic~="^/content/"`, s.opts.Namespace))
	// Connected before the walk: what the walk advertises must be servable
	// the moment a peer hears of it.
	s.mu.Lock()
	s.be = be
	s.mu.Unlock()
	if err := s.resync(sctx, be); err != nil {
		s.mu.Lock()
		s.be = nil
		s.mu.Unlock()
		if be.Close != nil {
			be.Close()
		}
		return err
	}
	if be.Version != nil {
		vctx, vcancel := context.WithTimeout(sctx, rpcTimeout)
		if v, err := be.Version(vctx); err == nil {
			s.mu.Lock()
			s.version = v
			s.mu.Unlock()
		}
		vcancel()
	}
	s.mu.Lock()
	version := s.version
	s.mu.Unlock()
	s.m.connected.Set(1)
	s.log.Info("following containerd", "socket", s.opts.Socket, "version", version, "blobs", s.Len())
	s.synced()

	tick := time.NewTicker(s.opts.Resync)
	defer tick.Stop()
	var settle <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err, ok := <-errs:
			if !ok || err == nil {
				err = errors.New("event stream closed")
			}
			return fmt.Errorf("containerd events: %w", err)
		case ev := <-evs:
			if ev == nil {
				continue
			}
			if s.handle(sctx, be, ev) {
				settle = time.After(gcSettle)
			}
		case <-settle:
			settle = nil
			if err := s.resync(sctx, be); err != nil {
				return err
			}
		case <-tick.C:
			if err := s.resync(sctx, be); err != nil {
				return err
			}
			s.synced()
		case <-s.resyncNow:
			if err := s.resync(sctx, be); err != nil {
				return err
			}
		}
	}
}

func (s *Store) synced() {
	if s.opts.OnSync != nil {
		s.opts.OnSync(s.Version())
	}
}

// Resync asks Run to walk the store again now.
func (s *Store) Resync() {
	select {
	case s.resyncNow <- struct{}{}:
	default:
	}
}

// disconnect drops the connection; with withdrawAll it also withdraws every
// advertised blob (peerd stops serving them).
func (s *Store) disconnect(withdrawAll bool) {
	s.mu.Lock()
	be := s.be
	s.be = nil
	var keys []blob.Key
	if withdrawAll {
		for d := range s.blobs {
			keys = append(keys, blob.Key(d))
		}
		s.blobs = map[digest.Digest]*entry{}
	}
	s.mu.Unlock()
	s.m.connected.Set(0)
	if be != nil && be.Close != nil {
		be.Close()
	}
	s.withdraw(keys...)
}

// resync walks containerd's content store and images, advertises what is
// new and withdraws what is gone.
func (s *Store) resync(ctx context.Context, be *Backend) (err error) {
	start := time.Now()
	defer func() {
		res := "ok"
		if err != nil {
			res = "error"
		}
		s.m.resyncs.WithLabelValues(res).Inc()
		s.m.resyncSeconds.Observe(time.Since(start).Seconds())
	}()
	found := map[digest.Digest]int64{} // digest -> size
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	err = be.Content.Walk(wctx, func(i content.Info) error {
		if _, perr := blob.ParseDigest(i.Digest.String()); perr == nil {
			found[i.Digest] = i.Size
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("walk containerd content: %w", err)
	}
	var added, removed []blob.Key
	s.mu.Lock()
	for d, size := range found {
		e, ok := s.blobs[d]
		if !ok {
			e = &entry{}
			s.blobs[d] = e
			added = append(added, blob.Key(d))
		}
		e.size = size
	}
	for d := range s.blobs {
		if _, ok := found[d]; !ok {
			delete(s.blobs, d)
			removed = append(removed, blob.Key(d))
		}
	}
	s.mu.Unlock()
	s.withdraw(removed...)
	// What is advertised is advertised after the image walk, so that a peer asking for it at once
	// gets its media type.
	defer func() { s.advertise(added...) }()

	lctx, lcancel := context.WithTimeout(ctx, rpcTimeout)
	imgs, err := be.Images.List(lctx)
	lcancel()
	if err != nil {
		return fmt.Errorf("list containerd images: %w", err)
	}
	// Walking an image reads its manifests; an image whose target did not
	// change since the last walk has nothing new to tell.
	names := make(map[string]bool, len(imgs))
	for _, img := range imgs {
		names[img.Name] = true
		if s.walked[img.Name] == img.Target.Digest {
			continue
		}
		s.walkImage(ctx, be, img)
	}
	for name := range s.walked {
		if !names[name] {
			delete(s.walked, name)
		}
	}
	if len(added) > 0 || len(removed) > 0 {
		s.log.Info("resynced containerd content", "blobs", s.Len(), "added", len(added), "removed", len(removed), "images", len(imgs))
	}
	return nil
}

// walkImage records the media type of every blob an image reaches that
// containerd holds. Children that were never pulled (other platforms of an
// index) are skipped.
func (s *Store) walkImage(ctx context.Context, be *Backend, img images.Image) {
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var fresh []blob.Key
	handler := images.HandlerFunc(func(ctx context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
		if _, err := blob.ParseDigest(desc.Digest.String()); err != nil {
			return nil, images.ErrSkipDesc
		}
		info, err := be.Content.Info(ctx, desc.Digest)
		if err != nil {
			if errdefs.IsNotFound(err) {
				return nil, images.ErrSkipDesc
			}
			return nil, err
		}
		if s.put(desc.Digest, info.Size) {
			fresh = append(fresh, blob.Key(desc.Digest))
		}
		s.setMediaType(desc.Digest, desc.MediaType)
		if !images.IsManifestType(desc.MediaType) && !images.IsIndexType(desc.MediaType) {
			return nil, nil
		}
		if desc.Size > maxManifestSize {
			return nil, fmt.Errorf("manifest %s is %d bytes, over %d", desc.Digest, desc.Size, maxManifestSize)
		}
		return images.Children(ctx, be.Content, desc)
	})
	if err := images.Walk(wctx, handler, img.Target); err != nil {
		delete(s.walked, img.Name)
		if wctx.Err() == nil {
			s.log.Warn("walk image", "image", img.Name, "target", img.Target.Digest, "err", err)
		}
	} else {
		s.walked[img.Name] = img.Target.Digest
	}
	s.advertise(fresh...)
}

// handle applies one event; it reports whether a delayed resync should
// follow (garbage collection may delete content without events).
func (s *Store) handle(ctx context.Context, be *Backend, env *events.Envelope) bool {
	if env.Namespace != s.opts.Namespace || env.Event == nil {
		return false
	}
	s.m.events.WithLabelValues(topicLabel(env.Topic)).Inc()
	v, err := typeurl.UnmarshalAny(env.Event)
	if err != nil {
		s.log.Debug("undecodable containerd event", "topic", env.Topic, "err", err)
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	switch e := v.(type) {
	case *eventstypes.ContentCreate:
		d, err := digest.Parse(e.Digest)
		if err != nil || d.Algorithm() != digest.SHA256 {
			return false
		}
		info, err := be.Content.Info(ctx, d)
		if err != nil {
			s.log.Debug("info of created content", "digest", d, "err", err)
			return false
		}
		if s.put(d, info.Size) {
			s.advertise(blob.Key(d))
		}
	case *eventstypes.ContentDelete:
		if d, err := digest.Parse(e.Digest); err == nil {
			s.remove(d)
		}
	case *eventstypes.ImageCreate:
		s.imageChanged(ctx, be, e.Name)
	case *eventstypes.ImageUpdate:
		s.imageChanged(ctx, be, e.Name)
	case *eventstypes.ImageDelete:
		return true
	}
	return false
}

func (s *Store) imageChanged(ctx context.Context, be *Backend, name string) {
	img, err := be.Images.Get(ctx, name)
	if err != nil {
		s.log.Debug("get changed image", "image", name, "err", err)
		return
	}
	s.walkImage(ctx, be, img)
}

func topicLabel(t string) string {
	switch t {
	case "/images/create", "/images/update", "/images/delete", "/content/create", "/content/delete":
		return t
	}
	if strings.HasPrefix(t, "/images/") || strings.HasPrefix(t, "/content/") {
		return "other"
	}
	return "foreign"
}

type metrics struct {
	connected     prometheus.Gauge
	reconnects    prometheus.Counter
	advertised    prometheus.Counter
	withdrawn     prometheus.Counter
	events        *prometheus.CounterVec
	resyncs       *prometheus.CounterVec
	resyncSeconds prometheus.Histogram
}

func newMetrics(s *Store, reg prometheus.Registerer) *metrics {
	m := &metrics{
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "peerd_containerd_connected", Help: "1 while peerd follows containerd's content store.",
		}),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_containerd_reconnects_total", Help: "Times the connection to containerd was lost or could not be made.",
		}),
		advertised: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_containerd_advertised_total", Help: "Blobs of containerd's content store handed to the peer network to advertise.",
		}),
		withdrawn: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_containerd_withdrawn_total", Help: "Blobs withdrawn because containerd deleted them (or peerd stopped following it).",
		}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_containerd_events_total", Help: "containerd events received, by topic.",
		}, []string{"topic"}),
		resyncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_containerd_resyncs_total", Help: "Full walks of containerd's content store, by result.",
		}, []string{"result"}),
		resyncSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "peerd_containerd_resync_duration_seconds", Help: "Time to walk containerd's content store and images.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}),
	}
	if reg != nil {
		blobs := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "peerd_containerd_blobs", Help: "Blobs of containerd's content store peerd advertises.",
		}, func() float64 { return float64(s.Len()) })
		reg.MustRegister(m.connected, m.reconnects, m.advertised, m.withdrawn, m.events, m.resyncs, m.resyncSeconds, blobs)
	}
	return m
}
