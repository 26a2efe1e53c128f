// Package doctor checks a node's setup for the mistakes that make peerd
// silently useless: containerd not consulting the mirror, layers thrown away
// after unpacking, a dead mount, a full disk, a firewalled port, a node that
// joined nobody, a clock that breaks TLS. Each check is a small function over
// Input; what a check reads (containerd, the filesystem, the peer network)
// comes through the interfaces below, so the CLI and the daemon run the same
// code over different sources, and tests over fakes.
package doctor

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"
)

// Status is a check's verdict.
type Status string

const (
	OK   Status = "ok"
	Warn Status = "warn"
	Fail Status = "fail"
)

// Statuses lists every Status, for metrics that export one series per status.
var Statuses = []Status{OK, Warn, Fail}

// Result is one check's finding: what it saw and, unless OK, the one-line fix.
type Result struct {
	Check  string `json:"check"`
	Status Status `json:"status"`
	Saw    string `json:"saw"`
	Fix    string `json:"fix,omitempty"`
}

// Report is the results of one run, in check order.
type Report struct {
	Time    time.Time `json:"time"`
	Results []Result  `json:"results"`
}

// Failed reports whether any check failed.
func (r Report) Failed() bool {
	for _, x := range r.Results {
		if x.Status == Fail {
			return true
		}
	}
	return false
}

// Get returns the result of the named check.
func (r Report) Get(check string) (Result, bool) {
	for _, x := range r.Results {
		if x.Check == check {
			return x, true
		}
	}
	return Result{}, false
}

// WriteTable writes one aligned line per check ("ok   containerd  reachable,
// v2.1.1") and the fix indented under each that is not OK.
func (r Report) WriteTable(w io.Writer) error {
	width := 0
	for _, x := range r.Results {
		width = max(width, len(x.Check))
	}
	var b strings.Builder
	for _, x := range r.Results {
		fmt.Fprintf(&b, "%-4s %-*s  %s\n", x.Status, width, x.Check, oneLine(x.Saw))
		if x.Fix != "" && x.Status != OK {
			fmt.Fprintf(&b, "     %-*s  fix: %s\n", width, "", oneLine(x.Fix))
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteJSON writes the report as one JSON object.
func (r Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// oneLine keeps a terminal table intact whatever an error message holds.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// Input is the configuration under test (the flags of 'peerd run') and the
// sources the checks read. A nil source turns its checks off.
type Input struct {
	// Containerd is the running containerd; nil when --containerd-socket is empty.
	Containerd Containerd
	// Socket is --containerd-socket, for messages.
	Socket string
	// ConfigFile is --containerd-config.
	ConfigFile string
	// HostsDir is --containerd-hosts-dir.
	HostsDir string
	// Registries are the --registries entries.
	Registries []string
	// Mirror is the URL containerd reaches peerd's HTTP face at.
	Mirror string
	// PullThrough is --pull-through: the mirror caches what it streams.
	PullThrough bool

	// FS reads the local machine.
	FS FS
	// CacheDir is the cache folder (<--data-dir>/cache).
	CacheDir string
	// CacheSize is --cache-size.
	CacheSize int64
	// Mount is --mount ("" when the mount is off).
	Mount string
	// Passthrough is --mount-passthrough.
	Passthrough bool
	// FUSE is the daemon's own mount; nil outside the daemon.
	FUSE FUSE

	// Peers is the daemon's peer network; nil outside the daemon or when it is off.
	Peers Peers
	// P2PPort and PeerPort name the ports, for fixes.
	P2PPort, PeerPort string

	cs ctrdState // what containerd said, asked once per run
}

// Check is one check: it appends its results.
type Check func(ctx context.Context, in *Input) []Result

// Local are the checks any process on the node can run from the flags.
var Local = []Check{CheckContainerd, CheckConfigPath, CheckHosts, CheckTransfer, CheckDiscard, CheckFUSE, CheckCacheFS}

// Daemon are the checks only the running daemon can answer (its peers, its mount).
var Daemon = []Check{CheckPassthrough, CheckRouting, CheckReachable}

// Run runs checks in order, each bounded by ctx.
func Run(ctx context.Context, in *Input, checks ...Check) Report {
	r := Report{Time: time.Now().UTC()}
	for _, c := range checks {
		r.Results = append(r.Results, c(ctx, in)...)
	}
	return r
}
