package p2p

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	lookupSeconds *prometheus.HistogramVec // result: found, not_found, error
	lookupCache   *prometheus.CounterVec   // result: hit, negative_hit, miss
	receivedBytes prometheus.Counter
	servedBytes   prometheus.Counter
	serveRequests *prometheus.CounterVec // result: ok, not_found, refused, bad_request, error
	peerErrors    *prometheus.CounterVec // kind: dial, status, read, timeout, size
	hedges        prometheus.Counter
	resumes       prometheus.Counter
	blames        prometheus.Counter
	provides      *prometheus.CounterVec // result: ok, error
	provideSecs   prometheus.Histogram
	advertised    prometheus.Gauge
	dials         prometheus.Counter
	records       prometheus.Gauge
	refused       prometheus.Counter
	handshakes    *prometheus.CounterVec // reason: no_certificate, bad_certificate, not_member, not_tls, timeout, closed, other
	// Fair sharing: transfers served now, busy answers received, and the
	// time a fetch waited because every holder was busy.
	uploadsInFlight prometheus.Gauge
	busyReceived    prometheus.Counter
	busyWait        prometheus.Histogram
	receivedByZone  *prometheus.CounterVec // relation: same, cross, unknown
	servedByZone    *prometheus.CounterVec // the asker's zone against ours
	joinReleased    prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		lookupSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "peerd_p2p_lookup_seconds",
			Help:    "Time of a DHT provider lookup (FindProviders), by result (found, not_found).",
			Buckets: []float64{0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1},
		}, []string{"result"}),
		lookupCache: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_p2p_lookup_cache_total",
			Help: "Provider lookups answered from the provider cache (hit, negative_hit, stale: expired and being refreshed in the background) or not (miss); hedged: a swarm pull's first lookup that took so long its first chunk started from the origin; late: a lookup that found nobody only because it ran out of time, followed by a longer one in the background; kept: a refresh that ran out of time, the known list kept; gather_skipped: a swarm pull's second lookup not made because no chunk waited for it.",
		}, []string{"result"}),
		receivedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_p2p_received_bytes_total", Help: "Blob bytes received from peers.",
		}),
		servedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_p2p_served_bytes_total", Help: "Blob bytes served to peers.",
		}),
		serveRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_p2p_serve_requests_total",
			Help: "Peer data-plane requests this node answered, by result (ok, not_found, refused, busy: at the upload bound, fanout: this blob goes to enough askers at once, bad_request, error).",
		}, []string{"result"}),
		peerErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_p2p_peer_errors_total",
			Help: "Failed reads from peers, by kind (dial, status, read, timeout, slow: under 256 KiB/s and left for another holder without penalty, size, not_found).",
		}, []string{"kind"}),
		hedges: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_p2p_hedged_requests_total", Help: "Requests to a second provider because the first was slow.",
		}),
		resumes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_p2p_resumed_transfers_total", Help: "Transfers that broke mid-way and resumed from another provider.",
		}),
		blames: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_p2p_blamed_peers_total", Help: "Peers blamed for bytes that failed verification.",
		}),
		provides: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_p2p_provides_total", Help: "DHT provide (advertise) operations, by result (ok, error).",
		}, []string{"result"}),
		provideSecs: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "peerd_p2p_provide_seconds", Help: "Time of one DHT provide.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		advertised: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "peerd_p2p_advertised_keys", Help: "Blobs this node advertises on the DHT.",
		}),
		dials: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_p2p_data_connections_total",
			Help: "TLS connections opened to peers' data planes (kept alive and reused across chunks).",
		}),
		records: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "peerd_p2p_provider_records",
			Help: "Provider records this node stores for the DHT (other nodes' advertisements of blobs near its ID), once flushed: the DHT buffers up to 256 new ones.",
		}),
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_p2p_tls_handshake_failures_total",
			Help: "Failed TLS handshakes on the peer data-plane port, by reason (no_certificate, bad_certificate, not_member, not_tls, timeout, closed, other).",
		}, []string{"reason"}),
		uploadsInFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "peerd_p2p_uploads_in_flight", Help: "Transfers this node is serving to peers now (bounded by --peer-upload-streams).",
		}),
		busyReceived: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_p2p_busy_answers_received_total", Help: "Busy answers (503) from providers at their upload bound; the asker tried another provider (no avoidance). Busy answers sent: peerd_p2p_serve_requests_total{result=\"busy\"}.",
		}),
		receivedByZone: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_p2p_received_bytes_by_zone_total",
			Help: "Blob bytes received from peers by zone relation: same (the peer told the same --zone), cross, unknown (either zone not set).",
		}, []string{"relation"}),
		servedByZone: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_p2p_served_bytes_by_zone_total",
			Help: "Blob bytes served to peers by the asker's zone relation: same (it told the same --zone), cross, unknown (either zone not set).",
		}, []string{"relation"}),
		busyWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "peerd_p2p_busy_wait_seconds", Help: "Time a fetch waited because every provider holding the bytes was busy or sent it to wait for other askers (up to --swarm-wait, then the origin; 4 s for other askers, then it insists).",
			Buckets: []float64{0.1, 0.25, 0.5, 1, 2, 4, 8, 16},
		}),
		joinReleased: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_p2p_join_peers_released_total",
			Help: "Connections to the peers this node joined through (a Lease holder, DNS-named peers), closed once the routing table refresh connected it to others: joiners free the holder's inbound slots.",
		}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "peerd_p2p_provider_records_refused_total",
			Help: fmt.Sprintf("Provider records refused because the store holds its maximum (%d); they are dropped until expired records make room.", maxProviderRecords),
		}),
	}
	if reg != nil {
		reg.MustRegister(m.lookupSeconds, m.lookupCache, m.receivedBytes, m.servedBytes, m.serveRequests,
			m.peerErrors, m.hedges, m.resumes, m.blames, m.provides, m.provideSecs, m.advertised, m.dials, m.records, m.refused, m.handshakes,
			m.uploadsInFlight, m.busyReceived, m.busyWait, m.receivedByZone, m.servedByZone, m.joinReleased)
	}
	return m
}
