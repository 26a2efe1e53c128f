package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/peerd-project/peerd/doctor"
)

func init() {
	register("doctor", "check this node's setup (containerd, hosts.toml, FUSE, disk, peers) and print the fix for each problem", doctorCmd)
}

// doctorPath is where the running daemon serves its doctor report (JSON) on --http-addr.
const doctorPath = "/debug/api/doctor"

// errChecksFailed makes 'peerd doctor' exit non-zero after printing its report.
var errChecksFailed = errors.New("one or more checks failed")

func doctorCmd(args []string) error {
	cfg := &runConfig{}
	fset := newFlagSet("doctor", `Check this node's setup with the flags and PEERD_* environment of 'peerd run'
(pass the running daemon's), print ok / warn / fail for each check, what it
saw and the one-line fix, and exit 1 when any check fails. Checks of the
peer network (routing table, ports reachable from a peer, clock) and of the
mount's passthrough come from the running daemon at --http-addr.`)
	registerCoreFlags(fset, cfg)
	registerP2PFlags(fset, &cfg.P2P)
	registerFUSEFlags(fset, &cfg.FUSE)
	registerWarmFlags(fset, &cfg.Warm)
	registerContainerdFlags(fset, &cfg.Containerd)
	registerK8sFlags(fset, &cfg.K8s)
	var jsonOut, local bool
	fset.BoolVar(&jsonOut, "json", false, "print the report as JSON")
	fset.BoolVar(&local, "local", false, "run only the checks this process can (skip asking the running daemon at --http-addr)")
	if err := parse(fset, args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	in, closeIn := doctorInput(cfg)
	defer closeIn()
	report := doctor.Run(ctx, in, doctor.Local...)
	if !local {
		report.Results = append(report.Results, daemonResults(ctx, cfg.HTTPAddr)...)
	}
	var err error
	if jsonOut {
		err = report.WriteJSON(os.Stdout)
	} else {
		err = report.WriteTable(os.Stdout)
	}
	if err != nil {
		return err
	}
	if report.Failed() {
		return errChecksFailed
	}
	return nil
}

// doctorInput is the doctor's view of a run configuration; closeIn releases
// the containerd connection.
func doctorInput(cfg *runConfig) (in *doctor.Input, closeIn func()) {
	c := &cfg.Containerd
	in = &doctor.Input{
		Socket:      c.Socket,
		ConfigFile:  c.ConfigFile,
		HostsDir:    c.HostsDir,
		Registries:  c.Registries.items,
		Mirror:      "http://" + mirrorHostPort(cfg.HTTPAddr),
		PullThrough: c.PullThrough,
		FS:          doctor.OS{},
		CacheDir:    filepath.Join(cfg.DataDir, "cache"),
		CacheSize:   int64(cfg.CacheSize),
		Mount:       cfg.FUSE.Mount,
		Passthrough: cfg.FUSE.Passthrough,
	}
	in.P2PPort, in.PeerPort = p2pPorts(&cfg.P2P)
	closeIn = func() {}
	if c.Socket != "" {
		x := &ctrdIntrospect{socket: c.Socket, ns: c.Namespace}
		in.Containerd, closeIn = x, x.close
	}
	return in, closeIn
}

// p2pPorts names the TCP ports of --p2p-addr and --peer-addr, for fixes.
func p2pPorts(c *p2pConfig) (p2pPort, peerPort string) {
	p2pPort = "the --p2p-addr port"
	parts := strings.Split(c.Addr, "/")
	for i := 0; i+1 < len(parts); i++ {
		if parts[i] == "tcp" {
			p2pPort = parts[i+1]
		}
	}
	peerPort = "the --peer-addr port"
	if _, p, err := net.SplitHostPort(c.PeerAddr); err == nil {
		peerPort = p
	}
	return p2pPort, peerPort
}

// daemonChecks are the checks the CLI takes from the running daemon.
var daemonChecks = map[string]bool{"fuse_passthrough": true, "p2p_routing": true, "p2p_reachable": true, "clock": true}

// daemonResults asks the running daemon for the checks only it can run.
func daemonResults(ctx context.Context, httpAddr string) []doctor.Result {
	url := "http://" + mirrorHostPort(httpAddr) + doctorPath
	fix := "start 'peerd run', or pass the running daemon's --http-addr (or --local for the local checks only)"
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return []doctor.Result{{Check: "daemon", Status: doctor.Fail, Saw: err.Error(), Fix: fix}}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return []doctor.Result{{Check: "daemon", Status: doctor.Fail, Saw: "no peerd answers at " + url + ": " + err.Error(), Fix: fix}}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return []doctor.Result{{Check: "daemon", Status: doctor.Fail, Saw: fmt.Sprintf("%s: %s %s", url, resp.Status, strings.TrimSpace(string(b))),
			Fix: "run a peerd that serves " + doctorPath + " on --http-addr"}}
	}
	var r doctor.Report
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&r); err != nil {
		return []doctor.Result{{Check: "daemon", Status: doctor.Fail, Saw: fmt.Sprintf("%s: bad answer: %v", url, err), Fix: fix}}
	}
	out := []doctor.Result{{Check: "daemon", Status: doctor.OK, Saw: fmt.Sprintf("peerd answers at %s (report of %s)", url, r.Time.Format(time.RFC3339))}}
	for _, x := range r.Results {
		if daemonChecks[x.Check] {
			out = append(out, x)
		}
	}
	return out
}

// ctrdIntrospect asks containerd over its socket, connecting on first use.
type ctrdIntrospect struct {
	socket, ns string
	c          *client.Client
	err        error
}

var _ doctor.Containerd = (*ctrdIntrospect)(nil)

func (x *ctrdIntrospect) client() (*client.Client, error) {
	if x.c != nil || x.err != nil {
		return x.c, x.err
	}
	// The gRPC client dials lazily; say plainly when there is nothing to dial.
	if _, err := os.Stat(x.socket); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			x.err = errors.New("socket does not exist")
		} else {
			x.err = err
		}
		return nil, x.err
	}
	x.c, x.err = client.New(x.socket, client.WithDefaultNamespace(x.ns), client.WithTimeout(5*time.Second))
	return x.c, x.err
}

func (x *ctrdIntrospect) Version(ctx context.Context) (string, error) {
	c, err := x.client()
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	v, err := c.Version(ctx)
	return v.Version, err
}

func (x *ctrdIntrospect) Plugins(ctx context.Context) ([]doctor.Plugin, error) {
	c, err := x.client()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := c.IntrospectionService().Plugins(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]doctor.Plugin, 0, len(resp.Plugins))
	for _, p := range resp.Plugins {
		dp := doctor.Plugin{Type: p.Type, ID: p.ID, Exports: p.Exports}
		if p.InitErr != nil {
			dp.InitErr = p.InitErr.Message
			if dp.InitErr == "" {
				dp.InitErr = "failed"
			}
		}
		out = append(out, dp)
	}
	return out, nil
}

func (x *ctrdIntrospect) close() {
	if x.c != nil {
		x.c.Close()
	}
}
