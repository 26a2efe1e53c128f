package fusefs

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	lookups     *prometheus.CounterVec
	opens       *prometheus.CounterVec
	readBytes   *prometheus.CounterVec
	readErrors  prometheus.Counter
	readSeconds prometheus.Histogram
	refused     *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &metrics{
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_fuse_lookups_total",
			Help: "Lookups of a name under <mount>/sha256, by result (cached, catalog, resolved, not_found, invalid).",
		}, []string{"result"}),
		opens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_fuse_opens_total",
			Help: "Files opened, by read mode (passthrough: the kernel reads the cache file; local: read from it by this process; lazy: through the cache, fetching on demand).",
		}, []string{"mode"}),
		readBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_fuse_read_bytes_total",
			Help: "Bytes served to FUSE read requests, by mode (local, lazy). Passthrough reads never reach peerd and are not counted.",
		}, []string{"mode"}),
		readErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_fuse_read_errors_total",
			Help: "FUSE reads answered with EIO (no source could serve the bytes within the read timeout).",
		}),
		readSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "peerd_fuse_lazy_read_seconds",
			Help:    "Time to serve one read request of a file that is not fully cached.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_fuse_refused_changes_total",
			Help: "Changes refused with EROFS that reached peerd (the kernel refuses most on the read-only mount already), by operation.",
		}, []string{"op"}),
	}
	reg.MustRegister(m.lookups, m.opens, m.readBytes, m.readErrors, m.readSeconds, m.refused)
	return m
}
