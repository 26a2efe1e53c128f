package itest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/doctor"
	"github.com/peerd-project/peerd/internal/testenv"
	"github.com/peerd-project/peerd/internal/testproc"
)

// 'peerd doctor' against real containerd 1.6 and 2.x daemons with the
// configurations the field gets wrong, and against two peerd daemons in a
// network namespace whose firewall drops new connections to one's p2p port.

// doctorCase is one containerd setup and what the doctor must say of it.
type doctorCase struct {
	name string
	// configPath sets the CRI registry config_path to the hosts folder.
	configPath bool
	// extra is appended to the CRI image table ([plugins."io.containerd.cri.v1.images"]
	// on 2.x, [plugins."io.containerd.grpc.v1.cri".containerd] on 1.x).
	extra string
	// registryFirst writes a hosts.toml that lists the registry before this mirror.
	registryFirst bool
	// want maps a check to its status and a text its saw (or, after "fix:", its fix) holds.
	want map[string][2]string
	exit int
}

func doctorCases(build ctrdBuild) []doctorCase {
	v2 := strings.HasSuffix(build.name, "2.x")
	noConfigPath := doctorCase{name: "without-config_path", exit: 1,
		want: map[string][2]string{"config_path": {"fail", "sets no registry config_path"}, "containerd": {"ok", "1.6"}}}
	if v2 {
		// 2.x's default list: local pulls would read it, transfer-service pulls cannot.
		noConfigPath.want = map[string][2]string{
			"config_path":      {"fail", `"/etc/containerd/certs.d:/etc/docker/certs.d" (from containerd's CRI image plugin) does not include`},
			"transfer_service": {"fail", "fix:use_local_image_pull = true"},
			"containerd":       {"ok", "v2."},
		}
	}
	discard := map[string][2]string{"discard_unpacked_layers": {"warn", "true (from " + ctrdIf(v2, "containerd's CRI image plugin", "") + ""},
		"transfer_service": {"ok", ctrdIf(v2, "CRI pulls locally (discard_unpacked_layers = true)", "do not use the transfer service")}}
	return []doctorCase{
		{name: "correct", configPath: true, exit: 0, want: map[string][2]string{
			"config_path":             {"ok", "includes"},
			"hosts.toml docker.io":    {"ok", "first"},
			"discard_unpacked_layers": {"ok", "false"},
			"transfer_service":        {"ok", ctrdIf(v2, "pulls through the transfer service, which reads hosts.toml from", "do not use the transfer service")},
		}},
		noConfigPath,
		{name: "registry-before-mirror", configPath: true, registryFirst: true, exit: 1, want: map[string][2]string{
			"hosts.toml docker.io": {"fail", "lists https://registry-1.docker.io first, not this mirror"},
		}},
		{name: "discard_unpacked_layers", configPath: true, extra: "discard_unpacked_layers = true", exit: 0, want: discard},
	}
}

func ctrdIf(v2 bool, a, b string) string {
	if v2 {
		return a
	}
	return b
}

func TestDoctorContainerd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts containerd daemons")
	}
	testenv.NeedRoot(t, "containerd")
	for _, b := range containerdBuilds(t) {
		t.Run(b.name, func(t *testing.T) {
			if b.daemon == "" {
				testenv.Missing(t, b.missing, b.how)
			}
			for _, c := range doctorCases(b) {
				t.Run(c.name, func(t *testing.T) { testDoctorCase(t, b, c) })
			}
		})
	}
}

func testDoctorCase(t *testing.T, b ctrdBuild, c doctorCase) {
	n := startDoctorCtrd(t, b, c)
	httpAddr := "127.0.0.1:30000" // the doctor's default: nothing answers there in --local mode
	args := []string{"--containerd-socket", n.sock, "--containerd-config", n.config, "--containerd-hosts-dir", n.hostsDir,
		"--registries", "docker.io"}
	dataDir := t.TempDir()
	var node *Node
	if c.name == "correct" {
		// The whole report, the daemon's part included, from a running peerd.
		node = StartNode(t, NodeOpts{Args: args, DataDir: dataDir})
		httpAddr = node.HTTPAddr
	}
	writeDoctorHosts(t, n.hostsDir, "http://"+httpAddr, c.registryFirst)
	docArgs := append([]string{"--http-addr", httpAddr, "--data-dir", dataDir, "--mount="}, args...)
	if node == nil {
		docArgs = append(docArgs, "--local")
	}
	rep, exit, out := runDoctor(t, nil, docArgs...)
	t.Logf("peerd doctor (exit %d):\n%s", exit, out)
	for check, w := range c.want {
		wantResult(t, rep, check, w)
	}
	if exit != c.exit {
		t.Errorf("exit status %d, want %d", exit, c.exit)
	}
	if node != nil {
		wantResult(t, rep, "daemon", [2]string{"ok", "peerd answers"})
		wantResult(t, rep, "p2p_routing", [2]string{"warn", "alone"})
		if v := node.Metric(t, "peerd_doctor_check", "check=config_path", "status=ok"); v != 1 {
			t.Errorf("daemon exports peerd_doctor_check{check=config_path,status=ok} = %v, want 1", v)
		}
	}
}

func wantResult(t *testing.T, rep doctor.Report, check string, w [2]string) {
	t.Helper()
	x, ok := rep.Get(check)
	if !ok {
		t.Errorf("no %s check in the report", check)
		return
	}
	text, field := w[1], x.Saw
	if f, ok := strings.CutPrefix(text, "fix:"); ok {
		text, field = f, x.Fix
	}
	if string(x.Status) != w[0] || !strings.Contains(field, text) {
		t.Errorf("%s: %s %q (fix %q); want %s with %q", check, x.Status, x.Saw, x.Fix, w[0], w[1])
	}
	if x.Status != doctor.OK && x.Fix == "" {
		t.Errorf("%s is %s without a fix", check, x.Status)
	}
}

// runDoctor runs 'peerd doctor --json' (under prefix, e.g. ip netns exec)
// and returns its report, exit status and the table the same run prints.
func runDoctor(t *testing.T, prefix []string, args ...string) (doctor.Report, int, string) {
	t.Helper()
	run := func(extra ...string) ([]byte, int) {
		argv := append(append(append([]string{}, prefix...), peerdBin, "doctor"), append(args, extra...)...)
		cmd := exec.Command(argv[0], argv[1:]...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatalf("peerd doctor: %v", err)
		}
		return out, cmd.ProcessState.ExitCode()
	}
	out, exit := run("--json")
	var rep doctor.Report
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("peerd doctor --json printed %q: %v", out, err)
	}
	table, _ := run()
	return rep, exit, string(table)
}

// writeDoctorHosts writes docker.io's hosts.toml with the real subcommand,
// or by hand with the registry listed before the mirror.
func writeDoctorHosts(t *testing.T, hostsDir, mirror string, registryFirst bool) {
	t.Helper()
	if !registryFirst {
		out, err := exec.Command(peerdBin, "containerd-config", "--hosts-dir", hostsDir, "--registries", "docker.io", "--mirror", mirror).CombinedOutput()
		if err != nil {
			t.Fatalf("peerd containerd-config: %v\n%s", err, out)
		}
		return
	}
	dir := filepath.Join(hostsDir, "docker.io")
	os.MkdirAll(dir, 0o755)
	body := fmt.Sprintf("server = \"https://registry-1.docker.io\"\n\n[host.\"https://registry-1.docker.io\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", mirror)
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

// startDoctorCtrd starts containerd with its CRI image plugin configured as
// c says (2.x runs the plugin, so its introspection exports the effective
// settings; 1.x's CRI plugin needs a CNI setup, so the doctor reads the file).
func startDoctorCtrd(t *testing.T, build ctrdBuild, c doctorCase) *ctrdNode {
	t.Helper()
	dir, err := os.MkdirTemp("", "pdoc")
	if err != nil {
		t.Fatal(err)
	}
	n := &ctrdNode{dir: dir, sock: filepath.Join(dir, "c.sock"), hostsDir: filepath.Join(dir, "certs.d"), config: filepath.Join(dir, "config.toml"), build: build}
	v2 := strings.HasSuffix(build.name, "2.x")
	cfg := fmt.Sprintf(`version = %[6]d
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime",
  "io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), n.sock, n.sock+".ttrpc", filepath.Join(dir, "opt"), map[bool]int{true: 3, false: 2}[v2])
	table, reg := `[plugins."io.containerd.grpc.v1.cri".containerd]`, `[plugins."io.containerd.grpc.v1.cri".registry]`
	if v2 {
		table, reg = `[plugins."io.containerd.cri.v1.images"]`+"\n  snapshotter = \"native\"", `[plugins."io.containerd.cri.v1.images".registry]`
	}
	cfg += table + "\n  " + c.extra + "\n"
	if c.configPath {
		cfg += fmt.Sprintf("%s\n  config_path = %q\n", reg, n.hostsDir)
	}
	if err := os.WriteFile(n.config, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	n.startDaemon(t)
	t.Cleanup(func() {
		n.stopDaemon()
		if t.Failed() {
			t.Logf("--- containerd config ---\n%s\n--- containerd log ---\n%s", cfg, testproc.Tail(filepath.Join(dir, "containerd.log"), 30))
		}
		os.RemoveAll(dir)
	})
	return n
}

// TestDoctorFirewalledP2PPort: node A's firewall drops new connections to
// its p2p port. A dialled B, so they are connected, but B cannot dial A
// back: A's doctor fails p2p_reachable naming the port; B's passes.
func TestDoctorFirewalledP2PPort(t *testing.T) {
	if testing.Short() {
		t.Skip("starts peerd daemons in a network namespace")
	}
	testenv.NeedRoot(t, "network namespaces")
	testenv.LookPath(t, "ip", "iproute2")
	testenv.LookPath(t, "nft", "nftables")
	ns := fmt.Sprintf("pdoc-fw%d", os.Getpid()%100000)
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	in := []string{"ip", "netns", "exec", ns}
	sh := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(in[0], append(in[1:], args...)...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	sh("ip", "link", "set", "lo", "up")
	// A stateful firewall, as on a real node: answers to A's own
	// connections pass, new connections to the p2p port are dropped.
	sh("nft", "add", "table", "inet", "pdoc")
	sh("nft", "add", "chain", "inet", "pdoc", "input", "{ type filter hook input priority 0; }")
	sh("nft", "add", "rule", "inet", "pdoc", "input", "ip", "daddr", "127.0.0.2", "tcp", "dport", "31001", "ct", "state", "new", "drop")

	b := startNetnsPeerd(t, in, "127.0.0.3")
	a := startNetnsPeerd(t, in, "127.0.0.2", "--bootstrap", fmt.Sprintf("/ip4/127.0.0.3/tcp/31001/p2p/%s", b.id))

	var rep doctor.Report
	var exit int
	var out string
	deadline := time.Now().Add(60 * time.Second)
	for {
		rep, exit, out = runDoctor(t, in, a.doctorArgs()...)
		r, _ := rep.Get("p2p_reachable")
		if !strings.Contains(r.Saw, "not checked") || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	t.Logf("A's peerd doctor (exit %d):\n%s", exit, out)
	wantResult(t, rep, "p2p_routing", [2]string{"ok", "connected"})
	wantResult(t, rep, "p2p_reachable", [2]string{"fail", "p2p 127.0.0.2:31001: i/o timeout"})
	wantResult(t, rep, "p2p_reachable", [2]string{"fail", "fix:inbound TCP port(s) 31001 "})
	wantResult(t, rep, "clock", [2]string{"ok", "offset"})
	if exit != 1 {
		t.Errorf("A: exit status %d, want 1", exit)
	}
	if r, _ := rep.Get("p2p_reachable"); strings.Contains(r.Saw, "peer 127.0.0.2:31002") {
		t.Errorf("the open peer port is reported unreachable: %s", r.Saw)
	}

	rep, exit, out = runDoctor(t, in, b.doctorArgs()...)
	t.Logf("B's peerd doctor (exit %d):\n%s", exit, out)
	wantResult(t, rep, "p2p_reachable", [2]string{"ok", "reached p2p 127.0.0.3:31001, peer 127.0.0.3:31002"})
	if exit != 0 {
		t.Errorf("B: exit status %d, want 0", exit)
	}
	if t.Failed() {
		a.dumpLog(t)
		b.dumpLog(t)
	}
}

type netnsPeerd struct {
	ip, id, dir string
	proc        *testproc.Proc
}

func (p *netnsPeerd) flags() []string {
	return []string{"--data-dir", p.dir, "--http-addr", p.ip + ":31000", "--p2p-addr", "/ip4/" + p.ip + "/tcp/31001",
		"--peer-addr", p.ip + ":31002", "--containerd-socket=", "--mount=", "--cache-size", "64MiB"}
}

func (p *netnsPeerd) doctorArgs() []string { return p.flags() }

func (p *netnsPeerd) dumpLog(t *testing.T) {
	t.Logf("--- peerd %s log ---\n%s", p.ip, p.proc.Tail(40))
}

// startNetnsPeerd runs 'peerd run' inside the namespace on ip, ports 31000-31002.
func startNetnsPeerd(t *testing.T, in []string, ip string, extra ...string) *netnsPeerd {
	t.Helper()
	p := &netnsPeerd{ip: ip, dir: t.TempDir()}
	p.id = peerID(t, p.dir)
	argv := append(append(append([]string{}, in...), peerdBin, "run"), append(p.flags(), extra...)...)
	var err error
	if p.proc, err = testproc.Start(testproc.Spec{Name: "peerd on " + ip, Args: argv, Log: filepath.Join(p.dir, "peerd.log")}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.proc.Stop(15 * time.Second) })
	// Started when its log says it serves HTTP.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = testproc.Poll(ctx, 50*time.Millisecond, p.proc.Done(), func(context.Context) error {
		if b, _ := os.ReadFile(p.proc.Log); !strings.Contains(string(b), "serving HTTP") {
			return errors.New("its log does not say it is serving HTTP")
		}
		return nil
	})
	if err != nil {
		b, _ := os.ReadFile(p.proc.Log)
		t.Fatalf("peerd on %s did not start: %v\n%s", ip, err, b)
	}
	return p
}
