// Package e2e runs a real multi-node peerd cluster on one machine: every node
// is a Linux network namespace on a private bridge with its own containerd
// and its own peerd, pulling real images from a real registry (Debian's
// docker-registry) whose egress is rate-limited with tc, so the origin is the
// bottleneck as it is in production. See README.md for the knobs.
//
// Network safety: the cluster lives in 10.213.7.0/24 inside namespaces this
// harness creates. The root namespace has no interface in that subnet, only a
// blackhole route for it (so a client started in the wrong namespace fails),
// and no namespace has a default route.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/cripod"
	"github.com/peerd-project/peerd/internal/testproc"
)

const (
	nsPrefix   = "pe2e-"      // every namespace this harness creates; leftovers are deleted by it
	dirPrefix  = "peerd-e2e-" // the run's work folder under os.TempDir()
	switchNS   = nsPrefix + "sw"
	originNS   = nsPrefix + "origin"
	subnet     = "10.213.7.0/24"
	originIP   = "10.213.7.2"
	regPort    = "5000"
	filePort   = "8080"
	peerdHTTP  = "127.0.0.1:30000"
	p2pPort    = 30001
	ctrdNS     = "k8s.io"
	lockFile   = "/run/lock/peerd-e2e.lock"
	registryID = originIP + ":" + regPort
	zoneLinkA  = "za" // the zone link's end on br0 (config.Zones)
	zoneLinkB  = "zb" // its end on br1
)

func nodeIP(i int) string { return fmt.Sprintf("10.213.7.%d", 10+i) }

// config is what the environment chooses; see README.md.
type config struct {
	Nodes        int
	ImageSize    int64
	Layers       int
	Rate         string // tc rate of the origin namespace's egress
	Containerd16 int    // how many of the last nodes run Debian's containerd 1.6
	ChunkSize    string
	Keep         bool   // keep the work folder after the run
	LogLevel     string // peerd --log-level
	Snapshotter  string // containerd snapshotter the nodes unpack into: native or overlayfs
	// CRINode: the last containerd 2.x node runs the chart's pod through
	// CRI instead of a peerd process (E2E_CRI_NODE=0 turns it off).
	CRINode bool
	// Zones: the first half of the nodes (and the origin) sit on bridge br0
	// (zone "a"), the rest on br1 (zone "b"); one veth link joins the two
	// bridges (zoneLinkA/zoneLinkB), so its counters are the bytes that
	// cross zones. Set by the tests that need it, not by the environment.
	Zones bool
}

func loadConfig() (config, error) {
	c := config{Nodes: 4, ImageSize: 100 << 20, Layers: 4, Rate: "200mbit", Containerd16: 1, ChunkSize: "1MiB", Snapshotter: "native"}
	if os.Getenv("E2E_SIZE") == "large" {
		// overlayfs: a native snapshot copies all its parents, so 8 nodes
		// holding a 1 GiB image in 8 layers would need 5.5 GiB each.
		c.Nodes, c.ImageSize, c.Layers, c.Rate, c.Snapshotter = 8, 1<<30, 8, "400mbit", "overlayfs"
	}
	var errs []error
	if v := os.Getenv("E2E_NODES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 3 || n > 40 {
			errs = append(errs, fmt.Errorf("E2E_NODES=%q: want 3 to 40", v))
		}
		c.Nodes = n
	}
	if v := os.Getenv("E2E_IMAGE_SIZE"); v != "" {
		n, err := parseSize(v)
		if err != nil || n < 1<<20 {
			errs = append(errs, fmt.Errorf("E2E_IMAGE_SIZE=%q: want a size of at least 1MiB (e.g. 100MiB, 1GiB)", v))
		}
		c.ImageSize = n
	}
	if v := os.Getenv("E2E_LAYERS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 64 {
			errs = append(errs, fmt.Errorf("E2E_LAYERS=%q: want 1 to 64", v))
		}
		c.Layers = n
	}
	if v := os.Getenv("E2E_RATE"); v != "" {
		c.Rate = v
	}
	if _, err := tcRateBits(c.Rate); err != nil {
		errs = append(errs, err)
	}
	if v := os.Getenv("E2E_CONTAINERD16_NODES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			errs = append(errs, fmt.Errorf("E2E_CONTAINERD16_NODES=%q: want 0 or more", v))
		}
		c.Containerd16 = n
	}
	if c.Containerd16 > c.Nodes-2 {
		errs = append(errs, fmt.Errorf("E2E_CONTAINERD16_NODES=%d: at most nodes-2 (%d): nodes 1 and 2 run containerd 2", c.Containerd16, c.Nodes-2))
	}
	if v := os.Getenv("E2E_CHUNK_SIZE"); v != "" {
		c.ChunkSize = v
	}
	if v := os.Getenv("E2E_SNAPSHOTTER"); v != "" {
		if v != "native" && v != "overlayfs" {
			errs = append(errs, fmt.Errorf("E2E_SNAPSHOTTER=%q: want native or overlayfs", v))
		}
		c.Snapshotter = v
	}
	c.CRINode = os.Getenv("E2E_CRI_NODE") != "0"
	c.Keep = os.Getenv("E2E_KEEP") == "1"
	c.LogLevel = "info"
	if v := os.Getenv("E2E_LOG_LEVEL"); v != "" {
		c.LogLevel = v
	}
	return c, errors.Join(errs...)
}

func parseSize(s string) (int64, error) {
	units := []struct {
		suf string
		m   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3}, {"B", 1}}
	for _, u := range units {
		if strings.HasSuffix(s, u.suf) {
			n, err := strconv.ParseInt(strings.TrimSuffix(s, u.suf), 10, 64)
			return n * u.m, err
		}
	}
	return strconv.ParseInt(s, 10, 64)
}

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// features are the parts of peerd this build has; a scenario that needs a
// missing one skips and names it.
type features struct {
	p2p        bool // --p2p-addr, --bootstrap, peerd id
	containerd bool // --containerd-socket, --registries, peerd containerd-config
	fuse       bool // --mount
	// socketFlag: --containerd-socket exists (it defaults to the machine's
	// containerd, which a node must never touch).
	socketFlag bool
	help       string // peerd run --help
}

// hasFlag reports whether `peerd run` lists --name.
func (c *cluster) hasFlag(name string) bool {
	for _, sep := range []string{" ", "\n", "\t"} {
		if strings.Contains(c.feats.help, "-"+name+sep) {
			return true
		}
	}
	return false
}

func (f features) missing(need ...string) string {
	var miss []string
	for _, n := range need {
		switch {
		case n == "p2p" && !f.p2p:
			miss = append(miss, "p2p (peerd run --p2p-addr/--bootstrap, peerd id)")
		case n == "containerd" && !f.containerd:
			miss = append(miss, "containerd integration (peerd run --containerd-socket/--registries, peerd containerd-config)")
		case n == "fuse" && !f.fuse:
			miss = append(miss, "FUSE (peerd run --mount)")
		}
	}
	return strings.Join(miss, ", ")
}

func detectFeatures(peerd string) (features, error) {
	out, _ := exec.Command(peerd, "run", "--help").CombinedOutput()
	help := string(out)
	if !strings.Contains(help, "-data-dir") {
		return features{}, fmt.Errorf("%s run --help does not list --data-dir:\n%s", peerd, help)
	}
	has := func(flag string) bool {
		return strings.Contains(help, "-"+flag+" ") || strings.Contains(help, "-"+flag+"\n") || strings.Contains(help, "-"+flag+"\t")
	}
	var f features
	idErr := exec.Command(peerd, "id", "--help").Run()
	f.p2p = has("p2p-addr") && has("bootstrap") && idErr == nil
	ccErr := exec.Command(peerd, "containerd-config", "--help").Run()
	f.containerd = has("containerd-socket") && has("registries") && has("containerd-hosts-dir") && has("containerd-config") && has("containerd-resync") && ccErr == nil
	f.fuse = has("mount")
	f.socketFlag = has("containerd-socket")
	f.help = help
	return f, nil
}

// --- processes ---------------------------------------------------------

// startProc starts a daemon of the cluster, its output appended to
// logFile. Its environment has no proxy settings (see cleanEnv).
func startProc(name, logFile string, args ...string) (*testproc.Proc, error) {
	return testproc.Start(testproc.Spec{Name: name, Args: args, Log: logFile, Env: cleanEnv()})
}

// cleanEnv drops proxy settings: every request of the cluster stays in it.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasSuffix(strings.ToLower(k), "_proxy") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// sh runs a short command and returns its combined output.
func sh(ctx context.Context, args ...string) (string, error) {
	return shTimeout(ctx, 2*time.Minute, args...)
}

func shTimeout(ctx context.Context, d time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = cleanEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func nsExec(ns string, args ...string) []string {
	return append([]string{"ip", "netns", "exec", ns}, args...)
}

// --- leftovers -----------------------------------------------------------

// cleanLeftovers removes what a crashed run left: namespaces (and the
// processes in them), mounts and folders by their fixed prefixes, and the
// blackhole route. The run lock guarantees no other run owns them.
func cleanLeftovers(ctx context.Context, logf func(string, ...any)) {
	out, _ := sh(ctx, "ip", "netns", "list")
	for _, line := range strings.Split(out, "\n") {
		ns, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		if !strings.HasPrefix(ns, nsPrefix) {
			continue
		}
		logf("e2e: removing leftover namespace %s", ns)
		killNS(ctx, ns)
		sh(ctx, "ip", "netns", "del", ns)
	}
	unmountUnder(filepath.Join(os.TempDir(), dirPrefix), logf)
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*"))
	for _, d := range dirs {
		logf("e2e: removing leftover folder %s", d)
		os.RemoveAll(d)
	}
	if out, _ := sh(ctx, "ip", "route", "show", "type", "blackhole", subnet); strings.TrimSpace(out) != "" {
		sh(ctx, "ip", "route", "del", "blackhole", subnet)
	}
}

// killNS kills every process inside a namespace (ours: daemons of a run).
func killNS(ctx context.Context, ns string) {
	out, _ := sh(ctx, "ip", "netns", "pids", ns)
	for _, f := range strings.Fields(out) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// unmountUnder lazily unmounts every mount whose path starts with prefix,
// deepest first (FUSE mounts of killed peerds, overlay mounts of containerd).
func unmountUnder(prefix string, logf func(string, ...any)) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var points []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(unescapeMount(fields[4]), prefix) {
			points = append(points, unescapeMount(fields[4]))
		}
	}
	f.Close()
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	for _, p := range points {
		if err := syscall.Unmount(p, syscall.MNT_DETACH); err != nil {
			logf("e2e: unmount %s: %v", p, err)
		}
	}
}

func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// --- the run lock and interrupt handling --------------------------------

var (
	activeMu sync.Mutex
	active   *cluster
)

func setActive(c *cluster) {
	activeMu.Lock()
	active = c
	activeMu.Unlock()
}

// enabled: the cluster takes minutes and the whole machine, so `go test ./...`
// (make test) leaves it to `make e2e`, which sets E2E=1.
func enabled() bool { return os.Getenv("E2E") == "1" }

func TestMain(m *testing.M) {
	if !enabled() {
		os.Exit(m.Run()) // the tests skip and say how to run them
	}
	if os.Geteuid() != 0 {
		fmt.Println("e2e: not root: the cluster needs network namespaces, tc, FUSE and containerd; run `make e2e` as root (CI does)")
		os.Exit(m.Run()) // the tests skip and say so
	}
	lock, err := acquireLock(30 * time.Minute)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "e2e: %v: tearing the cluster down\n", s)
		activeMu.Lock()
		c := active
		activeMu.Unlock()
		if c != nil {
			c.teardown()
		}
		os.Exit(130)
	}()
	cleanLeftovers(context.Background(), func(f string, a ...any) { fmt.Printf(f+"\n", a...) })
	code := m.Run()
	activeMu.Lock()
	c := active
	activeMu.Unlock()
	if c != nil { // a test that forgot its cleanup must not leave the cluster up
		c.teardown()
	}
	lock.Close()
	os.Exit(code)
}

// acquireLock serializes runs on one machine: the leftovers of a run are
// found by fixed names, so two runs at once would tear each other down.
func acquireLock(wait time.Duration) (*os.File, error) {
	os.MkdirAll(filepath.Dir(lockFile), 0o755)
	f, err := os.OpenFile(lockFile, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	said := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("another e2e run holds %s for more than %v", lockFile, wait)
		}
		if !said {
			fmt.Println("e2e: waiting for another e2e run on this machine to finish")
			said = true
		}
		time.Sleep(time.Second)
	}
}

// --- the cluster -------------------------------------------------------------

type binaries struct {
	peerd, origin, client string
	ctrd2, ctr2           string // containerd 2.x
	ctrd16, ctr16         string // Debian's containerd 1.6
}

type node struct {
	i        int
	ns       string
	ip       string
	dir      string
	sock     string
	hostsDir string
	mount    string
	ctrd     string // containerd binary
	ctr      string
	legacy   bool // Debian's containerd 1.6
	peerID   string
	// containerised: peerd runs as the chart's pod through this node's
	// containerd CRI (crinode_test.go), whose client cri is.
	containerised bool
	cri           *cripod.Client
	zone          string   // "a" or "b" when the cluster has zones (config.Zones)
	extra         []string // more peerd flags for this node's next start
	// podman: this node's Podman folder (TestPodman: its storage,
	// registries.conf drop-in and HOME), "" on a containerd node.
	podman, podmanDriver string

	containerd *testproc.Proc
	peerd      peerdInstance
}

func (n *node) name() string { return fmt.Sprintf("node%d", n.i) }

type cluster struct {
	t     *testing.T
	cfg   config
	feats features
	bin   binaries
	dir   string
	nodes []*node

	registry *testproc.Proc
	origin   *testproc.Proc
	cri      criAssets // of the containerised node

	mu    sync.Mutex
	procs []*testproc.Proc
	down  sync.Once
}

func (c *cluster) track(p *testproc.Proc) *testproc.Proc {
	c.mu.Lock()
	c.procs = append(c.procs, p)
	c.mu.Unlock()
	return p
}

// buildBinaries builds peerd (unless E2E_PEERD names one) and the helpers,
// and finds both containerd versions.
func buildBinaries(ctx context.Context, dir string) (binaries, error) {
	var b binaries
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	build := func(out, pkg string) error {
		cmd := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-o", out, pkg)
		cmd.Env = append(cleanEnv(), "CGO_ENABLED=0")
		if o, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %w\n%s", pkg, err, o)
		}
		return nil
	}
	b.peerd = os.Getenv("E2E_PEERD")
	if b.peerd == "" {
		b.peerd = filepath.Join(dir, "peerd")
		if err := build(b.peerd, "../cmd/peerd"); err != nil {
			return b, err
		}
	} else if abs, err := filepath.Abs(b.peerd); err == nil {
		b.peerd = abs
	}
	b.origin = filepath.Join(dir, "e2eorigin")
	b.client = filepath.Join(dir, "e2eclient")
	if err := build(b.origin, "./cmd/e2eorigin"); err != nil {
		return b, err
	}
	if err := build(b.client, "./cmd/e2eclient"); err != nil {
		return b, err
	}
	// containerd 2.x from the project's build script (cached by version).
	cmd := exec.CommandContext(ctx, "bash", "../tools/containerd2.sh")
	cmd.Env = append(cleanEnv(), "GO="+goBin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return b, fmt.Errorf("tools/containerd2.sh: %w\n%s", err, stderr.String())
	}
	d := strings.TrimSpace(string(out))
	if i := strings.LastIndexByte(d, '\n'); i >= 0 {
		d = d[i+1:]
	}
	b.ctrd2, b.ctr2 = filepath.Join(d, "containerd"), filepath.Join(d, "ctr")
	b.ctrd16, b.ctr16 = "/usr/bin/containerd", "/usr/bin/ctr"
	return b, nil
}

func requireTools(cfg config) error {
	var miss []string
	for _, p := range []string{"ip", "tc", "nsenter", "docker-registry"} {
		if _, err := exec.LookPath(p); err != nil {
			miss = append(miss, p)
		}
	}
	if cfg.Containerd16 > 0 {
		for _, p := range []string{"/usr/bin/containerd", "/usr/bin/ctr"} {
			if _, err := os.Stat(p); err != nil {
				miss = append(miss, p+" (apt-get install containerd, or E2E_CONTAINERD16_NODES=0)")
			}
		}
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		miss = append(miss, "/dev/fuse")
	}
	if len(miss) > 0 {
		return fmt.Errorf("missing: %s (apt-get install iproute2 docker-registry containerd fuse3)", strings.Join(miss, ", "))
	}
	return nil
}

// newCluster brings the whole cluster up; its teardown is registered first
// thing, so a failure half-way still removes everything.
func newCluster(t *testing.T) *cluster {
	t.Helper()
	return newClusterWith(t, nil)
}

// newClusterWith is newCluster with the environment's config adjusted by
// adjust (when non-nil) before anything starts.
func newClusterWith(t *testing.T, adjust func(*config)) *cluster {
	t.Helper()
	if !enabled() {
		t.Skip("the e2e cluster runs with `make e2e` (or E2E=1 go test -v ./e2e/), not with go test ./...")
	}
	if os.Geteuid() != 0 {
		t.Skip("e2e needs root (network namespaces, tc, FUSE, containerd); CI runs it as root")
	}
	cfg, err := loadConfig()
	if err != nil {
		t.Fatal(err)
	}
	if adjust != nil {
		adjust(&cfg)
	}
	if err := requireTools(cfg); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", dirPrefix)
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	// Fail now rather than with ENOSPC half-way through the scenarios.
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(dir, &sfs); err == nil {
		if free, need := int64(sfs.Bavail)*sfs.Bsize, diskNeed(cfg); free < need {
			os.RemoveAll(dir)
			t.Fatalf("%s has %s free; %d nodes with a %s image in %d layers (%s snapshotter, peerd --cache-size %s) need about %s",
				dir, human(free), cfg.Nodes, human(cfg.ImageSize), cfg.Layers, cfg.Snapshotter, human(peerdCacheSize(cfg)), human(need))
		}
	}
	c := &cluster{t: t, cfg: cfg, dir: dir}
	setActive(c)
	t.Cleanup(func() {
		if t.Failed() {
			c.dumpLogs()
		}
		c.teardown()
		setActive(nil)
	})
	ctx := context.Background()
	start := time.Now()
	if c.bin, err = buildBinaries(ctx, filepath.Join(dir, "bin")); err != nil {
		t.Fatal(err)
	}
	if c.feats, err = detectFeatures(c.bin.peerd); err != nil {
		t.Fatal(err)
	}
	t.Logf("e2e: %d nodes (last %d on containerd 1.6), image %s in %d layers, origin egress %s, peerd parts: p2p=%v containerd=%v fuse=%v; binaries ready in %v",
		cfg.Nodes, cfg.Containerd16, human(cfg.ImageSize), cfg.Layers, cfg.Rate, c.feats.p2p, c.feats.containerd, c.feats.fuse, time.Since(start).Round(time.Second))
	if cfg.CRINode && c.feats.p2p && c.feats.containerd && c.feats.fuse {
		if err := c.prepareCRI(ctx); err != nil {
			t.Fatal(err)
		}
	} else {
		c.cfg.CRINode = false
	}
	if err := c.network(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.startOrigin(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.startNodes(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("e2e: cluster up in %v (work folder %s)", time.Since(start).Round(time.Second), dir)
	return c
}

// network builds the switch, the origin and node namespaces and the routes.
func (c *cluster) network(ctx context.Context) error {
	// Refuse to shadow a subnet the host really uses.
	if out, _ := sh(ctx, "ip", "-o", "addr", "show", "to", subnet); strings.TrimSpace(out) != "" {
		return fmt.Errorf("the host already has an address in %s: %s", subnet, out)
	}
	if _, err := sh(ctx, "ip", "route", "add", "blackhole", subnet); err != nil {
		return err
	}
	steps := [][]string{
		{"ip", "netns", "add", switchNS},
		{"ip", "-n", switchNS, "link", "set", "lo", "up"},
		{"ip", "-n", switchNS, "link", "add", "br0", "type", "bridge"},
		{"ip", "-n", switchNS, "link", "set", "br0", "up"},
	}
	if c.cfg.Zones {
		// Zone b's bridge, joined to br0 by one veth pair born in the
		// switch namespace: everything between the zones crosses it.
		steps = append(steps,
			[]string{"ip", "-n", switchNS, "link", "add", "br1", "type", "bridge"},
			[]string{"ip", "-n", switchNS, "link", "set", "br1", "up"},
			[]string{"ip", "-n", switchNS, "link", "add", zoneLinkA, "type", "veth", "peer", "name", zoneLinkB},
			[]string{"ip", "-n", switchNS, "link", "set", zoneLinkA, "master", "br0", "up"},
			[]string{"ip", "-n", switchNS, "link", "set", zoneLinkB, "master", "br1", "up"})
	}
	for _, s := range steps {
		if _, err := sh(ctx, s...); err != nil {
			return err
		}
	}
	if err := c.attach(ctx, originNS, "origin", originIP, "br0"); err != nil {
		return err
	}
	// tbf on the origin's egress: registry and file origin share this link,
	// as a registry and its blob store share a WAN link.
	rateBits, err := tcRateBits(c.cfg.Rate)
	if err != nil {
		return err
	}
	burst := max(int64(256<<10), rateBits/8/100)
	if _, err := sh(ctx, "ip", "netns", "exec", originNS, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
		"rate", c.cfg.Rate, "burst", strconv.FormatInt(burst, 10), "latency", "200ms"); err != nil {
		return err
	}
	for i := 1; i <= c.cfg.Nodes; i++ {
		n := &node{i: i, ns: fmt.Sprintf("%sn%d", nsPrefix, i), ip: nodeIP(i), dir: filepath.Join(c.dir, fmt.Sprintf("n%d", i))}
		n.legacy = i > c.cfg.Nodes-c.cfg.Containerd16
		n.containerised = c.cfg.CRINode && i == criNodeIndex(c.cfg)
		bridge := "br0"
		if c.cfg.Zones {
			n.zone = "a"
			if i > c.cfg.Nodes/2 {
				n.zone, bridge = "b", "br1"
			}
		}
		if err := c.attach(ctx, n.ns, fmt.Sprintf("n%d", i), n.ip, bridge); err != nil {
			return err
		}
		c.nodes = append(c.nodes, n)
	}
	return c.checkIsolation(ctx)
}

// checkIsolation proves the safety properties before any traffic flows: no
// namespace has a default route, the root namespace has no address in the
// subnet, and the subnet is blackholed there.
func (c *cluster) checkIsolation(ctx context.Context) error {
	for _, ns := range append([]string{switchNS, originNS}, c.nsNames()...) {
		out, err := sh(ctx, "ip", "-n", ns, "route", "show", "default")
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "" {
			return fmt.Errorf("namespace %s has a default route: %s", ns, out)
		}
	}
	if out, _ := sh(ctx, "ip", "-o", "addr", "show", "to", subnet); strings.TrimSpace(out) != "" {
		return fmt.Errorf("the root namespace has an address in %s: %s", subnet, out)
	}
	if out, _ := sh(ctx, "ip", "route", "show", "type", "blackhole", subnet); !strings.Contains(out, subnet) {
		return fmt.Errorf("no blackhole route for %s in the root namespace", subnet)
	}
	return nil
}

// tcRateBits reads a tc rate like 200mbit, 1gbit, 50mbps.
func tcRateBits(r string) (int64, error) {
	s := strings.ToLower(r)
	mult := []struct {
		suf string
		m   int64
	}{{"gbit", 1e9}, {"mbit", 1e6}, {"kbit", 1e3}, {"gbps", 8e9}, {"mbps", 8e6}, {"kbps", 8e3}, {"bit", 1}}
	for _, m := range mult {
		if strings.HasSuffix(s, m.suf) {
			n, err := strconv.ParseFloat(strings.TrimSuffix(s, m.suf), 64)
			if err == nil && n > 0 {
				return int64(n * float64(m.m)), nil
			}
		}
	}
	return 0, fmt.Errorf("E2E_RATE=%q: want a tc rate like 200mbit, 1gbit or 50mbps", r)
}

// attach creates namespace ns with lo up and eth0 (ip/24) on the switch's
// bridge.
func (c *cluster) attach(ctx context.Context, ns, port, ip, bridge string) error {
	steps := [][]string{
		{"ip", "netns", "add", ns},
		{"ip", "-n", ns, "link", "set", "lo", "up"},
		// Both ends are born in their namespaces: the root namespace never
		// holds an interface of the cluster, even for a moment.
		{"ip", "link", "add", port, "netns", switchNS, "type", "veth", "peer", "name", "eth0", "netns", ns},
		{"ip", "-n", switchNS, "link", "set", port, "master", bridge, "up"},
		{"ip", "-n", ns, "addr", "add", ip + "/24", "dev", "eth0"},
		{"ip", "-n", ns, "link", "set", "eth0", "up"},
	}
	// No IPv6 (before the link comes up): its router solicitations and
	// neighbour discovery would count as egress. A kernel without IPv6 has
	// nothing to turn off.
	if _, err := os.Stat("/proc/sys/net/ipv6"); err == nil {
		steps = slices.Insert(steps, len(steps)-1,
			[]string{"ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"},
			[]string{"ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"},
			[]string{"ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1"})
	}
	for _, s := range steps {
		if _, err := sh(ctx, s...); err != nil {
			return err
		}
	}
	return nil
}

func (c *cluster) startOrigin(ctx context.Context) error {
	rdir := filepath.Join(c.dir, "registry")
	if err := os.MkdirAll(filepath.Join(rdir, "data"), 0o755); err != nil {
		return err
	}
	conf := fmt.Sprintf(`version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: 0.0.0.0:%s
`, filepath.Join(rdir, "data"), regPort)
	if err := os.WriteFile(filepath.Join(rdir, "config.yml"), []byte(conf), 0o644); err != nil {
		return err
	}
	if err := c.startRegistry(ctx); err != nil {
		return err
	}
	odir := filepath.Join(c.dir, "origin")
	if err := os.MkdirAll(odir, 0o755); err != nil {
		return err
	}
	p, err := startProc("origin", filepath.Join(c.dir, "origin.log"), nsExec(originNS, c.bin.origin, "-addr", "0.0.0.0:"+filePort, "-dir", odir)...)
	if err != nil {
		return err
	}
	c.origin = c.track(p)
	_, err = sh(ctx, nsExec(originNS, c.bin.client, "wait", "-url", "http://127.0.0.1:"+filePort+"/healthz")...)
	return err
}

func (c *cluster) startRegistry(ctx context.Context) error {
	rdir := filepath.Join(c.dir, "registry")
	p, err := startProc("registry", filepath.Join(rdir, "registry.log"), nsExec(originNS, "docker-registry", "serve", filepath.Join(rdir, "config.yml"))...)
	if err != nil {
		return err
	}
	c.registry = c.track(p)
	if _, err := sh(ctx, nsExec(originNS, c.bin.client, "wait", "-url", "http://127.0.0.1:"+regPort+"/v2/")...); err != nil {
		return fmt.Errorf("registry: %w (log: %s)", err, testproc.Tail(filepath.Join(rdir, "registry.log"), 10))
	}
	return nil
}

func (c *cluster) startNodes(ctx context.Context) error {
	var wg sync.WaitGroup
	errs := make([]error, len(c.nodes))
	for k, n := range c.nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[k] = c.startContainerd(ctx, n)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if c.feats.p2p {
		for _, n := range c.nodes {
			out, err := sh(ctx, c.bin.peerd, "id", "--data-dir", filepath.Join(n.dir, "data"))
			if err != nil {
				return err
			}
			n.peerID = strings.TrimSpace(lastLine(out))
		}
	}
	for _, n := range c.nodes {
		if err := c.startPeerd(n); err != nil {
			return err
		}
	}
	for _, n := range c.nodes {
		if err := c.waitReady(ctx, n); err != nil {
			return err
		}
		if n.containerised {
			if err := c.checkCRINode(n); err != nil {
				return err
			}
		}
	}
	return nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

func (c *cluster) startContainerd(ctx context.Context, n *node) error {
	cd := filepath.Join(n.dir, "containerd")
	n.sock = filepath.Join(cd, "containerd.sock")
	n.hostsDir = filepath.Join(n.dir, "hosts")
	for _, d := range []string{cd, n.hostsDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if c.feats.containerd {
		if _, err := sh(ctx, c.bin.peerd, "containerd-config", "--hosts-dir", n.hostsDir, "--registries", "http://"+registryID, "--mirror", "http://"+peerdHTTP); err != nil {
			return err
		}
	}
	n.ctrd, n.ctr = c.bin.ctrd2, c.bin.ctr2
	if n.legacy {
		n.ctrd, n.ctr = c.bin.ctrd16, c.bin.ctr16
	}
	conf, err := testproc.Containerd{Dir: cd, Socket: n.sock, HostsDir: n.hostsDir, V2: !n.legacy, Snapshotter: c.cfg.Snapshotter}.Render()
	args, env := nsExec(n.ns, n.ctrd, "--config", filepath.Join(cd, "config.toml")), cleanEnv()
	if n.containerised {
		conf, err = c.criContainerdConfig(n, cd)
		args, env = c.criContainerdArgs(n, filepath.Join(cd, "config.toml")), c.criEnv()
	}
	if err != nil {
		return fmt.Errorf("%s: %w", n.name(), err)
	}
	cfgFile := filepath.Join(cd, "config.toml")
	if err := os.WriteFile(cfgFile, []byte(conf), 0o644); err != nil {
		return err
	}
	p, err := testproc.Start(testproc.Spec{Name: n.name() + "/containerd", Args: args, Log: filepath.Join(n.dir, "containerd.log"), Env: env})
	if err != nil {
		return err
	}
	n.containerd = c.track(p)
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	err = testproc.Poll(wctx, 250*time.Millisecond, p.Done(), func(ctx context.Context) error {
		_, err := sh(ctx, nsExec(n.ns, n.ctr, "-a", n.sock, "version")...)
		return err
	})
	if err != nil {
		return fmt.Errorf("%s: containerd %s did not come up: %v\n%s", n.name(), n.ctrd, err, p.Tail(15))
	}
	if n.containerised {
		return c.criImport(ctx, n)
	}
	return nil
}

// peerdCacheSize is every node's --cache-size: room for three images, so a
// scenario's image and file fit next to the last scenario's.
func peerdCacheSize(cfg config) int64 { return max(3*cfg.ImageSize, 512<<20) }

// diskNeed is the disk a run needs at its peak: every node holding one
// image in containerd (the content plus its snapshots) and a full peerd
// cache, next to the registry's copy and an origin file. A native snapshot
// of layer k is a copy of layers 1..k, so its layers take (L+1)/2 images; an
// overlayfs snapshot holds only its own layer.
func diskNeed(cfg config) int64 {
	snapshots := cfg.ImageSize
	if cfg.Snapshotter == "native" {
		snapshots = cfg.ImageSize * int64(cfg.Layers+1) / 2
	}
	perNode := cfg.ImageSize + snapshots + peerdCacheSize(cfg)
	return int64(cfg.Nodes)*perNode + 2*cfg.ImageSize
}

func (c *cluster) peerdArgs(n *node) []string {
	cacheSize := peerdCacheSize(c.cfg)
	args := []string{c.bin.peerd, "run",
		"--data-dir", filepath.Join(n.dir, "data"),
		"--http-addr", peerdHTTP,
		"--upstream-allow", originIP + ":" + filePort + "," + registryID,
		"--cache-size", strconv.FormatInt(cacheSize>>20, 10) + "MiB",
		"--chunk-size", c.cfg.ChunkSize,
		"--log-level", c.cfg.LogLevel,
	}
	if c.feats.p2p {
		args = append(args, "--p2p-addr", fmt.Sprintf("/ip4/%s/tcp/%d", n.ip, p2pPort))
		// Every node gets the same static list, as a DaemonSet would (a node
		// skips itself): nodes 1 and 2. With node 1 alone, a restarted node 1
		// has nobody to dial and the others, still connected among
		// themselves, never dial it again.
		var boot []string
		for _, b := range c.nodes[:2] {
			boot = append(boot, fmt.Sprintf("/ip4/%s/tcp/%d/p2p/%s", b.ip, p2pPort, b.peerID))
		}
		args = append(args, "--bootstrap", strings.Join(boot, ","))
	}
	if c.feats.containerd {
		reg := registryID
		if c.hasFlag("pull-through") {
			// peerd fetches misses from the registry itself: tell it the
			// test registry speaks plain HTTP, as an operator would.
			reg = "http://" + registryID
		}
		args = append(args, "--containerd-socket", n.sock, "--containerd-namespace", ctrdNS, "--registries", reg,
			"--containerd-hosts-dir", n.hostsDir, "--containerd-config", filepath.Join(n.dir, "containerd", "config.toml"),
			// 1.x sends no event when content is committed: walk often.
			"--containerd-resync", "5s")
	} else if c.feats.socketFlag {
		args = append(args, "--containerd-socket=")
	}
	if c.feats.fuse {
		n.mount = filepath.Join(n.dir, "mnt")
		args = append(args, "--mount", n.mount)
	}
	return append(args, n.extra...)
}

func (c *cluster) startPeerd(n *node) error {
	if err := os.MkdirAll(filepath.Join(n.dir, "data"), 0o700); err != nil {
		return err
	}
	if n.containerised {
		return c.startPeerdCRI(n)
	}
	// nsenter, not ip netns exec: peerd joins only the node's network
	// namespace and stays in the host's mount namespace, so its FUSE mount
	// is visible machine-wide as on a real node (ip netns exec would give it
	// a private mount namespace).
	args := append([]string{"nsenter", "--net=/run/netns/" + n.ns, "--"}, c.peerdArgs(n)...)
	p, err := startProc(n.name()+"/peerd", filepath.Join(n.dir, "peerd.log"), args...)
	if err != nil {
		return err
	}
	n.peerd = procPeerd{c.track(p)}
	return nil
}

func (c *cluster) waitReady(ctx context.Context, n *node) error {
	if _, err := sh(ctx, nsExec(n.ns, c.bin.client, "wait", "-timeout", "60s", "-url", "http://"+peerdHTTP+"/readyz")...); err != nil {
		return fmt.Errorf("%s: peerd not ready: %w\n%s", n.name(), err, n.peerd.Tail(20))
	}
	return nil
}

// teardown stops every process, deletes the namespaces, unmounts, removes
// the route and (unless E2E_KEEP=1) the work folder. It is idempotent and
// safe from the signal handler.
func (c *cluster) teardown() {
	// Once, and every caller waits for it: the signal handler and the test's
	// cleanup may both get here, and neither may return (and exit) early.
	c.down.Do(c.doTeardown)
}

func (c *cluster) doTeardown() {
	// The containerised peerd stops through CRI while containerd still runs.
	for _, n := range c.nodes {
		c.stopCRI(n)
	}
	c.mu.Lock()
	procs := slices.Clone(c.procs)
	c.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Add(1)
		go func() { defer wg.Done(); p.Stop(10 * time.Second) }()
	}
	wg.Wait()
	ctx := context.Background()
	for _, ns := range append(c.nsNames(), originNS, switchNS) {
		killNS(ctx, ns)
		sh(ctx, "ip", "netns", "del", ns)
	}
	unmountUnder(c.dir, func(f string, a ...any) { fmt.Printf(f+"\n", a...) })
	sh(ctx, "ip", "route", "del", "blackhole", subnet)
	if c.cfg.Keep {
		fmt.Printf("e2e: work folder kept: %s\n", c.dir)
	} else {
		os.RemoveAll(c.dir)
	}
}

func (c *cluster) nsNames() []string {
	var names []string
	for _, n := range c.nodes {
		names = append(names, n.ns)
	}
	return names
}

func (c *cluster) dumpLogs() {
	logs := []string{filepath.Join(c.dir, "registry", "registry.log"), filepath.Join(c.dir, "origin.log")}
	for _, n := range c.nodes {
		logs = append(logs, filepath.Join(n.dir, "containerd.log"))
	}
	for _, l := range logs {
		c.t.Logf("--- last lines of %s ---\n%s", l, testproc.Tail(l, 25))
	}
	for _, n := range c.nodes {
		if n.peerd != nil {
			c.t.Logf("--- last lines of %s's peerd ---\n%s", n.name(), n.peerd.Tail(25))
		}
	}
	// Last, where a summary of the output still shows them: each node's
	// latest warnings and errors (a failed fill says which source refused).
	for _, n := range c.nodes {
		if n.peerd != nil {
			c.t.Logf("--- latest warnings of %s's peerd ---\n%s", n.name(), warnings(n.peerd.Logs(), 6))
		}
	}
}

// warnings is the last n WARN or ERROR lines of a log.
func warnings(log string, n int) string {
	var out []string
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
			out = append(out, line)
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	if len(out) == 0 {
		return "(none)"
	}
	return strings.Join(out, "\n")
}

// --- measurements ------------------------------------------------------------

// egress is the bytes the origin namespace (registry and file origin) has
// sent on its link, read from the interface counters.
func (c *cluster) egress() int64 {
	c.t.Helper()
	out, err := sh(context.Background(), nsExec(originNS, "cat", "/sys/class/net/eth0/statistics/tx_bytes")...)
	if err != nil {
		c.t.Fatal(err)
	}
	v, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	if err != nil {
		c.t.Fatalf("tx_bytes: %q: %v", out, err)
	}
	return v
}

// metric sums every sample of a metric family (all label sets) on a node;
// labelFilter, if set, must appear in the sample's labels.
func (c *cluster) metric(n *node, name, labelFilter string) (float64, error) {
	out, err := c.metricsText(n)
	if err != nil {
		return 0, err
	}
	var sum float64
	for _, line := range strings.Split(out, "\n") {
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		if labelFilter != "" && !strings.Contains(rest, labelFilter) {
			continue
		}
		f := strings.Fields(rest)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum, nil
}

// metricsText is n's peerd's Prometheus page.
func (c *cluster) metricsText(n *node) (string, error) {
	return sh(context.Background(), nsExec(n.ns, c.bin.client, "get", "-out", "-", "-timeout", "20s", "-url", "http://"+peerdHTTP+"/metrics/prometheus")...)
}

// peerServed sums the bytes every running node served to peers.
func (c *cluster) peerServed() int64 {
	var total int64
	for _, v := range c.servedByNode() {
		total += v
	}
	return total
}

// servedByNode is the bytes each running node served to peers, by node index.
func (c *cluster) servedByNode() map[int]int64 {
	out := map[int]int64{}
	for _, n := range c.nodes {
		if n.peerd == nil || !n.peerd.Running() {
			continue
		}
		v, err := c.metric(n, "peerd_p2p_served_bytes_total", "")
		if err != nil {
			c.t.Logf("%s: metrics: %v", n.name(), err)
			continue
		}
		out[n.i] = int64(v)
	}
	return out
}

// pull runs ctr's pull inside the node's namespace through its hosts dir
// (so through peerd when the containerd part wrote it).
func (c *cluster) pull(ctx context.Context, n *node, ref string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "ip", nsExec(n.ns, n.ctr, "-a", n.sock, "-n", ctrdNS, "images", "pull", "--hosts-dir", n.hostsDir, "--snapshotter", c.cfg.Snapshotter, ref)[1:]...)
	cmd.Env = cleanEnv()
	out, err := cmd.CombinedOutput()
	d := time.Since(start)
	if err != nil {
		return d, fmt.Errorf("%s: ctr pull %s: %w\n%s", n.name(), ref, err, testproc.LastLines(string(out), 15))
	}
	return d, nil
}

// removeImage drops an image and its content from a node's containerd, so
// large runs do not fill the disk.
func (c *cluster) removeImage(n *node, ref string) {
	if n.containerd == nil || !n.containerd.Running() {
		return
	}
	sh(context.Background(), nsExec(n.ns, n.ctr, "-a", n.sock, "-n", ctrdNS, "images", "rm", "--sync", ref)...)
}

type getResult struct {
	Bytes   int64   `json:"bytes"`
	SHA256  string  `json:"sha256"`
	Seconds float64 `json:"seconds"`
}

// get runs e2eclient get inside the node's namespace.
func (c *cluster) get(ctx context.Context, n *node, args ...string) (getResult, error) {
	cmd := exec.CommandContext(ctx, "ip", nsExec(n.ns, append([]string{c.bin.client, "get"}, args...)...)[1:]...)
	cmd.Env = cleanEnv()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return getResult{}, fmt.Errorf("%s: get: %w: %s", n.name(), err, strings.TrimSpace(stderr.String()))
	}
	var r getResult
	if err := json.Unmarshal([]byte(lastLine(string(out))), &r); err != nil {
		return r, fmt.Errorf("%s: get: output %q: %w", n.name(), out, err)
	}
	return r, nil
}

// --- images --------------------------------------------------------------

// image is a generated test image pushed to the registry.
type image struct {
	ref      string // registry/repo:tag
	repoRef  string // registry/repo
	digest   string // manifest digest
	size     int64  // manifest + config + layers
	layers   []string
	layerLen []int64
}

func (im image) byDigest() string { return im.repoRef + "@" + im.digest }

// pushImage generates an image of random layers and pushes it from inside
// the origin namespace (the root namespace cannot reach the registry).
func (c *cluster) pushImage(ctx context.Context, name string, seed uint64) image {
	c.t.Helper()
	dir := filepath.Join(c.dir, "images", name)
	im, err := generateImage(dir, c.cfg.ImageSize, c.cfg.Layers, seed)
	if err != nil {
		c.t.Fatal(err)
	}
	repo := "e2e/" + name
	c.pushDir(ctx, dir, repo, im.digest)
	im.repoRef = registryID + "/" + repo
	im.ref = im.repoRef + ":v1"
	return im
}

// pushDir pushes a generated image or artifact folder to the registry as
// repo:v1, checks the registry's digest and removes the folder.
func (c *cluster) pushDir(ctx context.Context, dir, repo, digest string) {
	c.t.Helper()
	out, err := shTimeout(ctx, 30*time.Minute, nsExec(originNS, c.bin.client, "push", "-registry", "127.0.0.1:"+regPort, "-repo", repo, "-tag", "v1", "-dir", dir)...)
	if err != nil {
		c.t.Fatal(err)
	}
	if got := lastLine(out); got != digest {
		c.t.Fatalf("push %s: registry digest %s, generated %s", repo, got, digest)
	}
	os.RemoveAll(dir) // the registry holds it now
}

// stats is p50 and max of durations.
func stats(ds []time.Duration) (p50, mx time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[(len(s)-1)/2], s[len(s)-1]
}

// row is one scenario's line of the report.
type row struct {
	scenario   string
	nodes      int
	size       int64
	first      time.Duration // the seeding node's time, if the scenario has one
	p50, max   time.Duration
	egress     int64
	peerServed int64
	note       string
}

var (
	rowsMu sync.Mutex
	rows   []row
)

func (c *cluster) report(r row) {
	c.t.Helper()
	rowsMu.Lock()
	rows = append(rows, r)
	rowsMu.Unlock()
	c.t.Log(header() + "\n" + r.String())
}

func header() string {
	return fmt.Sprintf("%-16s %5s %10s %8s %8s %8s %8s %12s  %s", "scenario", "nodes", "size", "first", "p50", "max", "egress/x", "peer-served", "note")
}

func (r row) String() string {
	first := "-"
	if r.first > 0 {
		first = r.first.Round(10 * time.Millisecond).String()
	}
	return fmt.Sprintf("%-16s %5d %10s %8s %8s %8s %8.2f %12s  %s", r.scenario, r.nodes, human(r.size), first,
		r.p50.Round(10*time.Millisecond), r.max.Round(10*time.Millisecond), float64(r.egress)/float64(r.size), human(r.peerServed), r.note)
}

func printRows(w io.Writer) {
	rowsMu.Lock()
	defer rowsMu.Unlock()
	if len(rows) == 0 {
		return
	}
	fmt.Fprintln(w, "\ne2e results (egress/x = origin egress ÷ size; first = the seeding node's time; p50/max over the other nodes):")
	fmt.Fprintln(w, header())
	for _, r := range rows {
		fmt.Fprintln(w, r.String())
	}
}

// upstreamSnapshot is each running node's peerd_fetched_bytes_total{source="upstream"}.
func (c *cluster) upstreamSnapshot() map[int]float64 {
	m := map[int]float64{}
	for _, n := range c.nodes {
		if n.peerd == nil || !n.peerd.Running() {
			continue
		}
		if v, err := c.metric(n, "peerd_fetched_bytes_total", `source="upstream"`); err == nil {
			m[n.i] = v
		}
	}
	return m
}

// logUpstream says which nodes' peerds fetched from the origin since
// before, so an egress above the bound names who caused it.
func (c *cluster) logUpstream(t *testing.T, before map[int]float64) {
	t.Helper()
	after := c.upstreamSnapshot()
	var parts []string
	for _, n := range c.nodes {
		if v, ok := after[n.i]; ok {
			parts = append(parts, fmt.Sprintf("%s=%s", n.name(), human(int64(v-before[n.i]))))
		}
	}
	t.Logf("bytes each peerd fetched from the origin itself: %s", strings.Join(parts, " "))
	if !t.Failed() {
		return
	}
	// What each node's provider lookups answered (counts since it started):
	// an origin fetch by a node that should have found a peer starts here.
	for _, n := range c.nodes {
		if n.peerd == nil || !n.peerd.Running() {
			continue
		}
		out, err := c.metricsText(n)
		if err != nil {
			continue
		}
		var lines []string
		for _, line := range strings.Split(out, "\n") {
			for _, p := range []string{"peerd_p2p_lookup_cache_total", "peerd_p2p_lookup_seconds_count", "peerd_p2p_swarm", "peerd_p2p_peer_errors_total",
				"peerd_p2p_serve_requests_total", "peerd_p2p_hedged_requests_total", "peerd_p2p_resumed_transfers_total", "peerd_source_errors_total"} {
				if strings.HasPrefix(line, p) {
					lines = append(lines, line)
					break
				}
			}
		}
		t.Logf("%s lookups and peer reads: %s", n.name(), strings.Join(lines, "; "))
	}
}
