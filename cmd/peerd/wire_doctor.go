package main

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/peerd-project/peerd/doctor"
	"github.com/peerd-project/peerd/k8s"
	"github.com/peerd-project/peerd/p2p"
	"github.com/prometheus/client_golang/prometheus"
)

const (
	// doctorEvery is how often the daemon runs the doctor's checks: a setup
	// problem (a config edited, a firewall rule added) shows within minutes
	// without checks costing anything noticeable.
	doctorEvery = 5 * time.Minute
	// doctorSettle is when the first run of every check comes; the run at
	// start has only the local checks: until bootstrap had time to connect,
	// "reached nobody" and "no peer to ask" would be false alarms.
	doctorSettle = 30 * time.Second
	// doctorFresh: a request for the report runs the checks again when the
	// last run is older than this (one run at a time), so 'peerd doctor'
	// shows the present, and repeated requests cost one run.
	doctorFresh = 2 * time.Second
)

// startDoctor runs the doctor at start and every doctorEvery, exports each
// check as peerd_doctor_check{check,status}, emits P2PMisconfigured for a
// failing check (at most once per check per hour), and serves the last
// report at doctorPath for 'peerd doctor'.
func startDoctor(ctx context.Context, a *app) error {
	if a.p2p != nil {
		a.p2p.ServeDialBack()
	}
	d := &daemonDoctor{
		log: a.log,
		gauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "peerd_doctor_check",
			Help: "1 for each doctor check's current status (ok, warn, fail), 0 for its other statuses; 'peerd doctor' prints what each saw and its fix.",
		}, []string{"check", "status"}),
		prev: map[string]doctor.Status{},
		input: func() (*doctor.Input, func()) {
			in, closeIn := doctorInput(a.cfg)
			if a.p2p != nil {
				in.Peers = doctorPeers{a.p2p}
			}
			if a.fuse != nil {
				in.FUSE = a.fuse
			}
			return in, closeIn
		},
	}
	if a.events != nil && a.events.Enabled() {
		d.events = k8s.NewMisconfigured(a.events, k8s.MisconfiguredEvery)
	}
	a.reg.MustRegister(d.gauge)
	a.doctor = d
	a.extra[doctorPath] = d
	// In the background: a containerd that accepts connections but does
	// not answer must not hold up the start.
	a.spawn(ctx, "doctor", func(ctx context.Context) {
		d.run(ctx, doctor.Local...)
		wait := doctorSettle
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			wait = doctorEvery
			d.run(ctx, d.all()...)
		}
	})
	return nil
}

type daemonDoctor struct {
	log    *slog.Logger
	gauge  *prometheus.GaugeVec
	events *k8s.Misconfigured // nil outside Kubernetes
	input  func() (*doctor.Input, func())

	mu   sync.Mutex // one run at a time; guards prev
	prev map[string]doctor.Status
	// lastMu guards the last report, apart from mu: a run can take up to a
	// minute, and the debug page must not wait for it.
	lastMu   sync.Mutex
	last     doctor.Report
	lastFull bool // last ran every check, not only the local ones
}

var _ http.Handler = (*daemonDoctor)(nil)

func (d *daemonDoctor) all() []doctor.Check {
	return append(append([]doctor.Check{}, doctor.Local...), doctor.Daemon...)
}

// run checks, exports and logs what changed; it returns the report.
func (d *daemonDoctor) run(ctx context.Context, checks ...doctor.Check) doctor.Report {
	d.mu.Lock()
	defer d.mu.Unlock()
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	in, closeIn := d.input()
	defer closeIn()
	r := doctor.Run(rctx, in, checks...)
	if ctx.Err() != nil {
		return r // stopping: the checks were cut short, not failing
	}
	d.gauge.Reset()
	seen := map[string]doctor.Status{}
	for _, x := range r.Results {
		seen[x.Check] = x.Status
		for _, st := range doctor.Statuses {
			v := 0.0
			if st == x.Status {
				v = 1
			}
			d.gauge.WithLabelValues(x.Check, string(st)).Set(v)
		}
		if d.prev[x.Check] != x.Status {
			switch x.Status {
			case doctor.OK:
				if d.prev[x.Check] != "" {
					d.log.Info("doctor: check passes now", "check", x.Check, "saw", x.Saw)
				}
			default:
				d.log.Warn("doctor: check "+string(x.Status), "check", x.Check, "saw", x.Saw, "fix", x.Fix)
			}
		}
		if x.Status == doctor.Fail && d.events != nil {
			d.events.Report(x.Check, x.Saw, x.Fix)
		}
	}
	d.prev = seen
	d.lastMu.Lock()
	d.last, d.lastFull = r, len(checks) == len(d.all())
	d.lastMu.Unlock()
	return r
}

// ServeHTTP answers GET with the report, running the checks again when the
// last run is older than doctorFresh.
func (d *daemonDoctor) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	rep, full := d.lastReport()
	if !full || time.Since(rep.Time) > doctorFresh {
		// A client that goes away must not leave a half-run report behind.
		rep = d.run(context.WithoutCancel(r.Context()), d.all()...)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if r.Method == http.MethodHead {
		return
	}
	rep.WriteJSON(w)
}

// lastReport is the last run's report and whether it ran every check.
func (d *daemonDoctor) lastReport() (doctor.Report, bool) {
	d.lastMu.Lock()
	defer d.lastMu.Unlock()
	return d.last, d.lastFull
}

// doctorPeers adapts the p2p node to the doctor.
type doctorPeers struct{ n *p2p.Node }

var _ doctor.Peers = doctorPeers{}

func (p doctorPeers) RoutingTableSize() int { return p.n.RoutingTableSize() }
func (p doctorPeers) ConnectedPeers() int   { return p.n.ConnectedPeers() }
func (p doctorPeers) BootstrapPeers() int   { return p.n.BootstrapPeers() }

func (p doctorPeers) DialBack(ctx context.Context) (doctor.DialBack, error) {
	r, err := p.n.DialBack(ctx)
	if errors.Is(err, p2p.ErrNoPeer) {
		return doctor.DialBack{}, doctor.ErrNoPeer
	}
	if err != nil {
		return doctor.DialBack{}, err
	}
	out := doctor.DialBack{Peer: r.Peer, ClockOffset: r.ClockOffset, RTT: r.RTT}
	for _, x := range r.Ports {
		out.Ports = append(out.Ports, doctor.PortCheck{Name: x.Name, Addr: x.Addr, Err: x.Err})
	}
	return out, nil
}
