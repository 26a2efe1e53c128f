package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// benchPeer is rows 3 and 4 on a two-node network: B reads a blob only A
// holds (mutually authenticated TLS between them), against a plain HTTP
// download of A's copy of the file from A's address; then the time to first
// byte of blobs nobody holds, through B and straight from the origin.
func benchPeer(ctx context.Context, c *config, t *table) error {
	size := c.size()
	s, err := startPeerSetup(ctx, c, "peer")
	if err != nil {
		return err
	}
	defer s.Stop()
	o, a, plain := s.o, s.a, s.plain

	// Baselines, all on the same loopback path to A's address: a plain
	// download that keeps the file on B's disk (as B's cache must), the same
	// download thrown away, and B filling a blob nobody holds from the origin
	// (the same cache writes, without peers).
	keepDir := filepath.Join(c.work, "peer-b-downloads")
	if err := os.MkdirAll(keepDir, 0o755); err != nil {
		return err
	}
	var peer, kept, discarded, cold, cpuPeer, cpuPlain []float64
	var cpuA, cpuB, cpuServer, cpuClient []float64
	gib := float64(size) / (1 << 30)
	var fromPeers, total float64
	var cur *node // this round's B, stopped however the round ends
	defer func() { cur.Stop() }()
	for r := 0; r <= c.rounds; r++ {
		// A advertises only with a peer in its routing table: B first.
		b, err := s.startB(ctx, fmt.Sprintf("peer-b%d", r))
		if err != nil {
			return err
		}
		cur = b
		hexd, rel, err := s.fillA(ctx, size)
		if err != nil {
			return err
		}
		_, relCold, err := writeBlob(o.dir, size)
		if err != nil {
			return err
		}
		recv0, _ := b.metric(ctx, "peerd_p2p_received_bytes_total")
		var p, k, d, cf, ca, cb, cf0, ck, cc float64
		runs := []func() error{
			func() error {
				if c.pprof != "" && r == 1 {
					done := make(chan error, 4)
					go func() { done <- a.profile(ctx, 2, filepath.Join(c.pprof, "peer-a.pprof")) }()
					go func() { done <- b.profile(ctx, 2, filepath.Join(c.pprof, "peer-b.pprof")) }()
					go func() { done <- b.profile(ctx, 1, filepath.Join(c.pprof, "peer-b.trace")) }()
					go func() { done <- a.profile(ctx, 1, filepath.Join(c.pprof, "peer-a.trace")) }()
					defer func() {
						for range 4 {
							if err := <-done; err != nil {
								t.note("profile of row 3: %v", err)
							}
						}
					}()
				}
				a0, err := cpuSeconds(a.PID())
				if err != nil {
					return err
				}
				if p, cb, err = measured(b.PID(), func() (float64, error) { return download(ctx, b.URL("/blobs/"+o.url(rel)), size, 0) }); err != nil {
					return err
				}
				a1, err := cpuSeconds(a.PID())
				ca = a1 - a0
				return err
			},
			func() error {
				// This process does nothing else meanwhile: its own CPU is
				// the client's (socket reads, page-cache writes, fsync).
				c0 := selfCPU()
				var err error
				k, ck, err = measured(plain.PID(), func() (float64, error) {
					return downloadToFile(ctx, plain.URL+"/"+hexd+"/data", filepath.Join(keepDir, hexd), size)
				})
				cc = selfCPU() - c0
				return err
			},
			func() error {
				var err error
				d, cf0, err = measured(plain.PID(), func() (float64, error) { return download(ctx, plain.URL+"/"+hexd+"/data", size, 0) })
				return err
			},
			func() error {
				if c.pprof != "" && r == 1 {
					done := make(chan error, 1)
					go func() { done <- b.profile(ctx, 1, filepath.Join(c.pprof, "peer-b-cold.pprof")) }()
					defer func() {
						if err := <-done; err != nil {
							t.note("profile of row 3: %v", err)
						}
					}()
				}
				var err error
				cf, err = download(ctx, b.URL("/blobs/"+o.url(relCold)), size, 0)
				return err
			},
		}
		if err := rotateRuns(ctx, s.settle, runs, r); err != nil {
			return err
		}
		recv1, _ := b.metric(ctx, "peerd_p2p_received_bytes_total")
		os.Remove(filepath.Join(o.dir, rel))
		os.Remove(filepath.Join(o.dir, relCold))
		// The saved download goes with B's cache, at the end of the round:
		// page-cache growth is slow on this kind of VM (a plain download
		// into a new file drops from ~700 to ~300 MiB/s as the cache grows),
		// so both must grow by the same files within a round.
		os.Remove(filepath.Join(keepDir, hexd))
		b.Stop()
		os.RemoveAll(b.DataDir)
		if r == 0 {
			t.note("row 3 warm-up round (not counted): B from A %.0f, plain download kept %.0f, discarded %.0f, B cold fill from origin %.0f MiB/s", p, k, d, cf)
			continue
		}
		peer, kept, discarded, cold = append(peer, p), append(kept, k), append(discarded, d), append(cold, cf)
		cpuPeer, cpuPlain = append(cpuPeer, (ca+cb)/gib), append(cpuPlain, cf0/gib)
		cpuA, cpuB = append(cpuA, ca/gib), append(cpuB, cb/gib)
		cpuServer, cpuClient = append(cpuServer, ck/gib), append(cpuClient, cc/gib)
		fromPeers += recv1 - recv0
		total += float64(size)
	}
	rk := median(ratios(peer, kept))
	t.add(row{group: "3", what: "peer transfer: B reads a blob A holds (mTLS), one GET at B, vs a plain download from A saved on B's disk",
		peerd: mibs(median(peer)), baseline: mibs(median(kept)) + " plain HTTP → file + fsync", ratio: fmt.Sprintf("%.2f", rk), goal: "≥ 0.8", verdict: atLeast(rk, 0.8)})
	rd := median(ratios(peer, discarded))
	t.add(row{group: "3", what: "peer transfer, vs the plain download thrown away",
		peerd: mibs(median(peer)), baseline: mibs(median(discarded)) + " plain HTTP → /dev/null", ratio: fmt.Sprintf("%.2f", rd), goal: "≥ 0.8", verdict: atLeast(rd, 0.8)})
	t.add(row{group: "3", what: "peer transfer CPU per GiB: A + B (TLS both ways, verification, cache write) vs the file server",
		peerd: fmt.Sprintf("%.2f s", median(cpuPeer)), baseline: fmt.Sprintf("%.2f s", median(cpuPlain)), ratio: fmt.Sprintf("%.2f", median(ratios(cpuPeer, cpuPlain)))})
	t.add(row{group: "3", what: "peer transfer CPU per GiB, A (serving) / B (receiving, verifying, caching) separately, vs the plain download saved to disk: file server / client (socket read, page-cache write, fsync: the write any cache pays)",
		peerd:    fmt.Sprintf("A %.2f s / B %.2f s", median(cpuA), median(cpuB)),
		baseline: fmt.Sprintf("server %.2f s / client %.2f s", median(cpuServer), median(cpuClient)),
		ratio:    fmt.Sprintf("%.2f / %.2f", median(ratios(cpuA, cpuServer)), median(ratios(cpuB, cpuClient)))})
	rc := median(ratios(peer, cold))
	t.add(row{group: "3", what: "peer transfer, vs B filling from the origin (same cache writes, no peers)",
		peerd: mibs(median(peer)), baseline: mibs(median(cold)) + " B cold from origin", ratio: fmt.Sprintf("%.2f", rc)})
	if total > 0 && fromPeers < 0.99*total {
		t.note("row 3: only %.1f%% of B's bytes came from A", 100*fromPeers/total)
	}
	b, err := s.startB(ctx, fmt.Sprintf("peer-b%d", c.rounds+1))
	if err != nil {
		return err
	}
	defer b.Stop()
	return missTTFB(ctx, c, t, o, b, "2 nodes")
}

// peerSetup is what rows 3 and 3b share: an origin, node A that fills
// blobs from it and serves them to peers, and a plain file server on A's
// address serving A's own cache folder (the baseline's copy is A's).
type peerSetup struct {
	c      *config
	o      *origin
	a      *node
	plain  *fileServer
	common []string // flags of every node: A and its readers
	settle time.Duration
}

// startPeerSetup starts the origin, A and the file server; name prefixes
// their folders.
func startPeerSetup(ctx context.Context, c *config, name string) (s *peerSetup, err error) {
	s = &peerSetup{c: c, settle: settleTime()}
	defer func() {
		if err != nil {
			s.Stop()
		}
	}()
	if s.o, err = startOrigin(ctx, c, "origin-"+name); err != nil {
		return nil, err
	}
	s.common = []string{"--upstream-allow", s.o.host(), "--cache-size", fmt.Sprintf("%dMiB", int64(c.rounds+2)*c.sizeMB+64)}
	s.common = append(s.common, strings.Fields(os.Getenv("BENCH_PEER_ARGS"))...)
	if s.a, err = startNode(ctx, c, filepath.Join(c.work, name+"-a"), nodeOpts{args: s.common}); err != nil {
		return nil, err
	}
	if s.plain, err = startFileServer(ctx, s.a.IP, filepath.Join(s.a.DataDir, "cache", "blobs", "sha256")); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *peerSetup) Stop() {
	s.plain.Stop()
	s.a.Stop()
	if s.o != nil {
		s.o.fs.Stop()
	}
}

// startB starts a reader bootstrapped to A and waits until it is ready.
// Readers are new nodes every round, their data deleted afterwards: their
// cache writes then reuse memory the page cache already had, as the plain
// downloads' do (the files they saved are deleted too), instead of touching
// RAM the VM never handed out before.
func (s *peerSetup) startB(ctx context.Context, name string) (*node, error) {
	b, err := startNode(ctx, s.c, filepath.Join(s.c.work, name), nodeOpts{args: slices.Concat(s.common, []string{"--bootstrap", s.a.P2PAddr})})
	if err != nil {
		return nil, err
	}
	if err := b.waitReady(ctx, 30*time.Second); err != nil {
		b.Stop()
		return nil, err
	}
	return b, nil
}

// fillA has A fetch a new blob from the origin, verify it and advertise it
// (A advertises only with a peer in its routing table: start a reader
// first). It returns the digest hex and the blob's path on the origin.
func (s *peerSetup) fillA(ctx context.Context, size int64) (string, string, error) {
	provided, err := s.a.metric(ctx, "peerd_p2p_provides_total", "result=ok")
	if err != nil {
		return "", "", err
	}
	hexd, rel, err := fill(ctx, s.a, s.o, size)
	if err != nil {
		return "", "", err
	}
	if err := s.a.waitMetric(ctx, provided+1, time.Minute, "peerd_p2p_provides_total", "result=ok"); err != nil {
		return "", "", err
	}
	return hexd, rel, nil
}

// settleTime is the pause before each run of rows 3, 3b and 7.
func settleTime() time.Duration {
	return time.Duration(envInt("BENCH_SETTLE_MS", 3000)) * time.Millisecond
}

// rotateRuns runs round r's runs one after another, each after a sync and
// a pause of settle, starting one further along each round so load bursts
// from elsewhere hit every kind.
func rotateRuns(ctx context.Context, settle time.Duration, runs []func() error, r int) error {
	for i := range runs {
		// Every run starts with no dirty pages: on a VM whose disk
		// writes a few hundred MiB/s, earlier runs' writeback would
		// otherwise slow whoever comes next.
		syscall.Sync()
		// ... and with the same free memory: on a VM that reports free
		// pages to its host (virtio-balloon free page reporting, 2 s
		// after they are freed), the first write into a reported page
		// faults on the host, and a run right after another run freed
		// its pages would write into memory the next run cannot have.
		if err := sleep(ctx, settle); err != nil {
			return err
		}
		if err := runs[(i+r)%len(runs)](); err != nil {
			return err
		}
	}
	return nil
}

// selfCPU is this process's user+system CPU time so far, in seconds.
func selfCPU() float64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// missTTFB is row 4: time to first byte of blobs nobody holds, through
// node n (its DHT lookup finds no provider, then the origin) and straight
// from the origin, alternating, from a client in its own process. Each
// sample is also cut at the origin's own timings (splitMiss), so the
// diagnostic rows say whether time was added before the origin saw the
// request, by the origin, or after its first byte.
func missTTFB(ctx context.Context, c *config, t *table, o *origin, n *node, where string) error {
	const size = 256 << 10
	count := 200
	if c.quick {
		count = 60
	}
	var direct, through, added []time.Duration
	var splits []missPair
	lookups0, _ := n.metric(ctx, "peerd_p2p_lookup_seconds_count")
	hedged0, _ := n.metric(ctx, "peerd_p2p_lookup_cache_total", "result=hedged")
	tc, err := startTTFBClient()
	if err != nil {
		return err
	}
	defer tc.stop()
	stop := profileCPU(c, "miss-host.pprof")
	if c.pprof != "" {
		go n.profile(ctx, 10, filepath.Join(c.pprof, "miss-peerd.pprof"))
	}
	for i := 0; i < count; i++ {
		_, rel, err := writeBlob(o.dir, size)
		if err != nil {
			stop()
			return err
		}
		var ds, df, ps, pf time.Time
		dRun := func() error { var err error; ds, df, err = tc.at(o.url(rel), size); return err }
		pRun := func() error { var err error; ps, pf, err = tc.at(n.URL("/blobs/"+o.url(rel)), size); return err }
		first, second := dRun, pRun
		if i%2 == 1 {
			first, second = pRun, dRun
		}
		if err := first(); err != nil {
			stop()
			return err
		}
		if err := second(); err != nil {
			stop()
			return err
		}
		os.Remove(filepath.Join(o.dir, rel))
		d, p := df.Sub(ds), pf.Sub(ps)
		direct, through, added = append(direct, d), append(through, p), append(added, p-d)
		if sp, ok := splitMiss(ctx, o, rel, ds, df, ps, pf); ok {
			splits = append(splits, sp)
		}
	}
	stop()
	lookups, _ := n.metric(ctx, "peerd_p2p_lookup_seconds_count")
	hedged, _ := n.metric(ctx, "peerd_p2p_lookup_cache_total", "result=hedged")
	t.note("row 4 (%s): %.0f DHT lookups for %d blobs; %.0f first chunks started from the origin before their lookup answered (--miss-hedge)", where, lookups-lookups0, count, hedged-hedged0)
	for _, q := range []struct {
		name string
		p    float64
	}{{"p50", .5}, {"p99", .99}} {
		add := quantile(added, q.p)
		t.add(row{group: "4", what: fmt.Sprintf("miss: time to first byte %s (%d blobs, %s, no provider)", q.name, count, where),
			peerd: ms(quantile(through, q.p)), baseline: ms(quantile(direct, q.p)) + " origin direct",
			ratio: "+" + ms(add), goal: "added ≤ 20 ms", verdict: atMost(float64(add)/float64(time.Millisecond), 20)})
	}
	reportMissSplits(t, where, splits)
	return nil
}
