package k8s

import "github.com/prometheus/client_golang/prometheus"

// Metrics of bootstrap, leadership and Events. A nil *Metrics records nothing.
type Metrics struct {
	rounds *prometheus.CounterVec
	leader prometheus.Gauge
	events *prometheus.CounterVec
	reads  *prometheus.CounterVec
}

// NewMetrics registers the package's metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		rounds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_bootstrap_rounds_total",
			Help: "Bootstrap rounds by mode and result (connected, alone, failed).",
		}, []string{"mode", "result"}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "peerd_k8s_lease_leader",
			Help: "1 while this node holds the bootstrap Lease, else 0.",
		}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_k8s_events_total",
			Help: "Kubernetes Events emitted on the node's Node object, by reason.",
		}, []string{"reason"}),
		reads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "peerd_k8s_lease_reads_total",
			Help: "Reads of the bootstrap Lease by the election, by where they were answered: watch (this node's watched copy, no request) or api (a GET: the holder before renewing, or while the watch is not in sync).",
		}, []string{"from"}),
	}
	if reg != nil {
		reg.MustRegister(m.rounds, m.leader, m.events, m.reads)
	}
	return m
}

func (m *Metrics) round(mode, result string) {
	if m != nil {
		m.rounds.WithLabelValues(mode, result).Inc()
	}
}

func (m *Metrics) setLeader(v bool) {
	if m == nil {
		return
	}
	if v {
		m.leader.Set(1)
	} else {
		m.leader.Set(0)
	}
}

func (m *Metrics) leaseRead(from string) {
	if m != nil {
		m.reads.WithLabelValues(from).Inc()
	}
}

func (m *Metrics) event(reason string) {
	if m != nil {
		m.events.WithLabelValues(reason).Inc()
	}
}
