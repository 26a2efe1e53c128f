package cache

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	evictions    prometheus.Counter
	verify       *prometheus.CounterVec
	fetched      *prometheus.CounterVec
	sourceErrors *prometheus.CounterVec
	fillSeconds  *prometheus.HistogramVec
	fillErrors   prometheus.Counter
	passthrough  prometheus.Counter
	readBytes    *prometheus.CounterVec
	swarmFills   prometheus.Counter
	diskFull     prometheus.Counter
	corrupt      prometheus.Counter
}

func newMetrics(c *Cache, reg prometheus.Registerer) *metrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &metrics{
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_cache_evictions_total", Help: "Blobs evicted from the cache to stay under its size bound.",
		}),
		verify: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_cache_verifications_total", Help: "Completed blobs hashed against their digest, by result (ok, mismatch).",
		}, []string{"result"}),
		fetched: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_fetched_bytes_total", Help: "Bytes filled into the cache, by source (peer, upstream, ...).",
		}, []string{"source"}),
		sourceErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_source_errors_total", Help: "Failed chunk fetches, by source.",
		}, []string{"source"}),
		fillSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "peerd_chunk_fill_seconds", Help: "Time to fill one chunk, by the source that served it.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"source"}),
		fillErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_chunk_fill_failures_total", Help: "Chunk fills that no source could satisfy.",
		}),
		passthrough: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_cache_passthrough_chunks_total", Help: "Chunks served without being stored because the cache was full of blobs in use.",
		}),
		readBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_cache_read_bytes_total", Help: "Bytes read through the cache, by whether the chunk was already present (hit) or had to be filled (miss).",
		}, []string{"result"}),
		diskFull: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_cache_disk_full_total", Help: "Cache writes the filesystem refused for want of space or quota; the cache then evicts blobs nobody reads or serves the bytes without storing them.",
		}),
		corrupt: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_cache_corrupt_chunks_total", Help: "Chunks of verified blobs that failed their check on first read after a start; each is discarded and fetched again.",
		}),
		swarmFills: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_cache_swarm_origin_fills_total", Help: "Chunks a peer asked for that the rendezvous assigns to this node, fetched from the origin on its request.",
		}),
	}
	reg.MustRegister(m.corrupt, m.diskFull, m.swarmFills, m.evictions, m.verify, m.fetched, m.sourceErrors, m.fillSeconds, m.fillErrors, m.passthrough, m.readBytes,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "peerd_cache_size_bytes", Help: "Bytes held by the cache."},
			func() float64 { return float64(c.used.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "peerd_cache_limit_bytes", Help: "The cache's size bound."},
			func() float64 { return float64(c.opts.MaxBytes) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "peerd_cache_blobs", Help: "Blobs the cache holds bytes of."},
			func() float64 { c.mu.Lock(); defer c.mu.Unlock(); return float64(len(c.blobs)) }),
	)
	return m
}
