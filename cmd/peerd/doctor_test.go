package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/doctor"
	"github.com/peerd-project/peerd/k8s"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// flagsOf runs a command with --help and returns the flag names its usage lists.
func flagsOf(t *testing.T, run func([]string) error) map[string]bool {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stderr
	os.Stderr = w
	err = run([]string{"--help"})
	os.Stderr = old
	w.Close()
	out, _ := io.ReadAll(r)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("--help: %v", err)
	}
	names := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`).FindAllStringSubmatch(string(out), -1) {
		names[m[1]] = true
	}
	if len(names) < 10 {
		t.Fatalf("found only %d flags in:\n%s", len(names), out)
	}
	return names
}

// 'peerd doctor' checks the daemon's configuration only if it takes every flag 'peerd run' does.
func TestDoctorTakesRunFlags(t *testing.T) {
	run, doc := flagsOf(t, runCmd), flagsOf(t, doctorCmd)
	for name := range run {
		if !doc[name] {
			t.Errorf("'peerd run --%s' is not a flag of 'peerd doctor'", name)
		}
	}
	if !doc["json"] || !doc["local"] {
		t.Error("'peerd doctor' lacks --json or --local")
	}
}

func TestDoctorExitStatus(t *testing.T) {
	dir := t.TempDir()
	base := []string{"--local", "--data-dir", dir, "--mount=", "--cache-size", "1MiB"}
	if err := doctorCmd(append(base, "--containerd-socket=")); err != nil {
		t.Errorf("every check passes, yet: %v", err)
	}
	if err := doctorCmd(append(base, "--containerd-socket", dir+"/none.sock")); !errors.Is(err, errChecksFailed) {
		t.Errorf("containerd missing: err = %v, want %v", err, errChecksFailed)
	}
	t.Setenv("PEERD_CONTAINERD_SOCKET", dir+"/none.sock")
	if err := doctorCmd(base); !errors.Is(err, errChecksFailed) {
		t.Errorf("containerd missing by PEERD_CONTAINERD_SOCKET: err = %v, want %v", err, errChecksFailed)
	}
}

func TestDaemonResults(t *testing.T) {
	rep := doctor.Report{Time: time.Now(), Results: []doctor.Result{
		{Check: "containerd", Status: doctor.Fail, Saw: "the daemon's own view"},
		{Check: "p2p_reachable", Status: doctor.Fail, Saw: "peer x cannot reach p2p 10.0.0.1:30001: i/o timeout", Fix: "allow inbound"},
		{Check: "clock", Status: doctor.OK, Saw: "offset 1ms"},
	}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != doctorPath {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(rep)
	}))
	defer srv.Close()
	got := daemonResults(context.Background(), srv.Listener.Addr().String())
	var checks []string
	for _, x := range got {
		checks = append(checks, x.Check+"="+string(x.Status))
	}
	// The CLI keeps its own local checks; it takes only the daemon-only ones.
	if strings.Join(checks, " ") != "daemon=ok p2p_reachable=fail clock=ok" {
		t.Errorf("results %v", checks)
	}

	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	got = daemonResults(context.Background(), addr)
	if len(got) != 1 || got[0].Check != "daemon" || got[0].Status != doctor.Fail || !strings.Contains(got[0].Fix, "--http-addr") {
		t.Errorf("no daemon: %+v", got)
	}
}

func TestDaemonDoctor(t *testing.T) {
	dir := t.TempDir()
	d := &daemonDoctor{
		log:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		gauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "peerd_doctor_check"}, []string{"check", "status"}),
		prev:  map[string]doctor.Status{},
		input: func() (*doctor.Input, func()) {
			// containerd is missing: the containerd check fails.
			return &doctor.Input{Containerd: &ctrdIntrospect{socket: dir + "/none.sock"}, Socket: dir + "/none.sock", ConfigFile: dir + "/config.toml",
				HostsDir: dir, FS: doctor.OS{}, CacheDir: dir, CacheSize: 1 << 20}, func() {}
		},
	}
	// The run at start has only the local checks; a request right after
	// it still gets every check.
	if _, ok := d.run(context.Background(), doctor.Local...).Get("p2p_routing"); ok {
		t.Error("the run at start asked about peers before bootstrap had time to connect")
	}
	srv := httptest.NewServer(d)
	defer srv.Close()
	resp, err := http.Post(srv.URL, "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST: %s, want 405", resp.Status)
	}
	resp, err = http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	var rep doctor.Report
	err = json.NewDecoder(resp.Body).Decode(&rep)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if x, ok := rep.Get("containerd"); !ok || x.Status != doctor.Fail {
		t.Errorf("report %+v: want containerd failing", rep.Results)
	}
	if _, ok := rep.Get("p2p_routing"); !ok {
		t.Error("the daemon's report lacks the peer checks")
	}
	if v := testutil.ToFloat64(d.gauge.WithLabelValues("containerd", "fail")); v != 1 {
		t.Errorf("peerd_doctor_check{check=containerd,status=fail} = %v, want 1", v)
	}
	if v := testutil.ToFloat64(d.gauge.WithLabelValues("containerd", "ok")); v != 0 {
		t.Errorf("peerd_doctor_check{check=containerd,status=ok} = %v, want 0", v)
	}
	if v := testutil.ToFloat64(d.gauge.WithLabelValues("cache_fs", "ok")); v != 1 {
		t.Errorf("peerd_doctor_check{check=cache_fs,status=ok} = %v, want 1", v)
	}
}

// A failing check becomes a P2PMisconfigured Event on the Node, once per
// check however often the doctor runs.
func TestDaemonDoctorEvents(t *testing.T) {
	dir := t.TempDir()
	c := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", UID: "uid-a"}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := k8s.NewEvents(ctx, k8s.EventsOptions{Client: c, NodeName: "node-a", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	defer events.Close()
	d := &daemonDoctor{
		log:    slog.New(slog.NewTextHandler(io.Discard, nil)),
		gauge:  prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "peerd_doctor_check"}, []string{"check", "status"}),
		prev:   map[string]doctor.Status{},
		events: k8s.NewMisconfigured(events, time.Hour),
		input: func() (*doctor.Input, func()) {
			return &doctor.Input{Containerd: &ctrdIntrospect{socket: dir + "/none.sock"}, Socket: dir + "/none.sock", ConfigFile: dir + "/config.toml",
				HostsDir: dir, FS: doctor.OS{}, CacheDir: dir, CacheSize: 1 << 20}, func() {}
		},
	}
	for range 3 {
		d.run(ctx, d.all()...)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		list, err := c.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var got []corev1.Event
		for _, ev := range list.Items {
			if ev.Reason == k8s.ReasonMisconfigured {
				got = append(got, ev)
			}
		}
		if len(got) > 0 {
			if len(got) != 1 || got[0].Count > 1 || !strings.Contains(got[0].Message, "check containerd failed") || got[0].InvolvedObject.Name != "node-a" {
				t.Errorf("events %+v: want one P2PMisconfigured on node-a naming the containerd check", got)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("no P2PMisconfigured event for the failing containerd check")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
