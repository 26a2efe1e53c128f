package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/peerd-project/peerd/web"
)

func init() {
	register("status", "show a running daemon's node, peers, cache and last transfers (from its debug API)", statusCmd)
}

// runDefault is the default of one of run's core flags, so that status
// finds the daemon where run puts it without a second copy of the value.
func runDefault(name string) string {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	registerCoreFlags(fs, &runConfig{})
	return fs.Lookup(name).DefValue
}

func statusCmd(args []string) error {
	fs := newFlagSet("status", "Show a running daemon's node, peers, cache and last transfers with where their\nbytes came from, read from its "+web.Prefix+"api/snapshot on --http-addr.")
	addr := fs.String("http-addr", runDefault("http-addr"), "the running daemon's --http-addr")
	asJSON := fs.Bool("json", false, "print the daemon's snapshot as JSON, as it is")
	peers := fs.Int("peers", 30, "peers to list at most")
	last := fs.Int("transfers", 15, "last transfers to list at most")
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for the daemon")
	if err := parse(fs, args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	body, err := fetchSnapshot(ctx, *addr)
	if err != nil {
		return err
	}
	if *asJSON {
		_, err := os.Stdout.Write(body)
		return err
	}
	var s web.Snapshot
	if err := json.Unmarshal(body, &s); err != nil {
		return fmt.Errorf("the daemon's snapshot is not what this peerd reads: %v", err)
	}
	return writeStatus(os.Stdout, s, time.Now(), *peers, *last)
}

// snapshotURL is where the daemon on addr serves its snapshot; a daemon
// listening on every address is asked on loopback.
func snapshotURL(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("--http-addr %q: %v", addr, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port) + web.Prefix + "api/snapshot", nil
}

func fetchSnapshot(ctx context.Context, addr string) ([]byte, error) {
	u, err := snapshotURL(addr)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("no answer in time: %w", err)
		}
		return nil, fmt.Errorf("cannot reach the daemon at %s: %v (is `peerd run` running with this --http-addr?)", u, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %v", u, err)
	}
	if resp.StatusCode != http.StatusOK {
		msg := strings.TrimSpace(string(body))
		if len(msg) > 200 {
			msg = msg[:200] + "…"
		}
		return nil, fmt.Errorf("%s answered %s: %s", u, resp.Status, msg)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		return nil, fmt.Errorf("%s answered %s, not JSON: is a peerd daemon listening there?", u, ct)
	}
	return body, nil
}

// writeStatus prints s for a terminal: the node, its peers, the cache, the
// last transfers with their bytes by source, and the doctor's complaints.
func writeStatus(out io.Writer, s web.Snapshot, now time.Time, maxPeers, maxTransfers int) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	n := s.Node
	ready := "ready"
	if !n.Ready {
		ready = "NOT READY"
		if n.ReadyReason != "" {
			ready += " (" + n.ReadyReason + ")"
		}
	}
	uptime := "-"
	if !n.Started.IsZero() {
		uptime = web.Duration(now.Sub(n.Started).Truncate(time.Second))
	}
	fmt.Fprintf(w, "node\t%s  peerd %s  up %s  %s\n", n.PeerID, n.Version, uptime, ready)
	detail := fmt.Sprintf("bootstrap %s, routing table %d, runtime %s", n.Bootstrap, n.RoutingTable, n.Runtime)
	if n.PeerAddr != "" {
		detail += ", peer data plane " + n.PeerAddr
	}
	fmt.Fprintf(w, "\t%s\n", detail)
	c := s.Cache
	fmt.Fprintf(w, "cache\t%s of %s, %d blobs\n", web.Size(c.Used), web.Size(c.Limit), c.Blobs)
	if cd := s.Containerd; cd.Enabled {
		link := "not connected"
		if cd.Connected {
			link = "connected " + cd.Version
		}
		fmt.Fprintf(w, "containerd\t%s, mirror %s, %d blobs shared\n", link, cd.Mirror, cd.Blobs)
	}
	w.Flush()

	connected := 0
	for _, p := range s.Peers {
		if p.Connected {
			connected++
		}
	}
	fmt.Fprintf(out, "\nPeers: %d connected, %d known\n", connected, len(s.Peers))
	if len(s.Peers) > 0 {
		fmt.Fprintln(w, "ID\tADDRESS\tCONNECTED\tRTT\tSERVED TO\tREAD FROM\tFAILURES\tAVOIDED UNTIL")
		for i, p := range s.Peers {
			if i == maxPeers {
				fmt.Fprintf(w, "… %d more\n", len(s.Peers)-maxPeers)
				break
			}
			since := "no"
			if p.Connected {
				since = web.Ago(now, p.ConnectedSince)
			}
			avoided := "-"
			if !p.AvoidedUntil.IsZero() && p.AvoidedUntil.After(now) {
				avoided = p.AvoidedUntil.Local().Format("15:04:05")
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", web.Short(p.ID, 20), p.Addr, since, web.Duration(p.RTT),
				web.Size(p.ServedTo), web.Size(p.ReadFrom), p.Failures, avoided)
		}
		w.Flush()
	}

	fmt.Fprintf(out, "\nLast transfers: %d kept\n", len(s.Transfers))
	if len(s.Transfers) > 0 {
		fmt.Fprintln(w, "TIME\tFACE\tKEY\tCACHE\tCONTAINERD\tPEERS\tORIGIN\tDURATION\tRESULT")
		for i, t := range s.Transfers {
			if i == maxTransfers {
				fmt.Fprintf(w, "… %d more\n", len(s.Transfers)-maxTransfers)
				break
			}
			key := web.Short(web.Redact(t.Key), 23)
			if t.Face == "peer" && t.Peer != "" {
				key += " → " + web.Short(t.Peer, 14)
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", t.Start.Local().Format("15:04:05"), t.Face, key,
				bytesOrDash(t.Bytes.Cache), bytesOrDash(t.Bytes.Containerd), bytesOrDash(t.Bytes.Peers), bytesOrDash(t.Bytes.Origin),
				web.Duration(t.Duration), web.Short(t.Result, 60))
		}
		w.Flush()
	}

	var bad []string
	for _, f := range s.Doctor {
		if f.Status != "ok" {
			bad = append(bad, fmt.Sprintf("  %s %s: %s", f.Status, f.Check, f.Saw))
		}
	}
	if len(bad) > 0 {
		fmt.Fprintf(out, "\nDoctor:\n%s\n", strings.Join(bad, "\n"))
	}
	return nil
}

func bytesOrDash(n int64) string {
	if n == 0 {
		return "-"
	}
	return web.Size(n)
}
