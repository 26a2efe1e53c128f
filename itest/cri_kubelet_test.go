package itest

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/cripod"
	"github.com/peerd-project/peerd/internal/testenv"
	"github.com/peerd-project/peerd/internal/testproc"
	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// A containerd 2.x with its CRI plugin, and the part of kubelet that turns a
// pod spec into CRI calls (internal/cripod): enough to run the chart's
// DaemonSet pod as a node would, with no kubelet, API server or CNI.

// criNode is a containerd serving CRI from its own root, state and socket.
type criNode struct {
	dir      string // everything of this node
	sock     string
	config   string // containerd's config.toml (the chart's containerd.configFile)
	hostsDir string // registry config_path (the chart's containerd.hostsDir)
	ctrBin   string
	daemon   string
	cmd      *exec.Cmd
	done     chan struct{}
	cri      *cripod.Client
	rt       runtimeapi.RuntimeServiceClient
	img      runtimeapi.ImageServiceClient
}

// criSandboxImage is the pause image the test builds and imports; the CRI
// plugin uses it for every pod sandbox and never pulls it.
const criSandboxImage = "peerd.invalid/pause:test"

// criNoDevHandler runs privileged containers without the host's devices:
// the test's stand-in for a node without /dev/fuse.
const criNoDevHandler = "nodev"

func startCRINode(t *testing.T, ctrdDir string) *criNode {
	t.Helper()
	// Short paths: unix socket names are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "cri")
	if err != nil {
		t.Fatal(err)
	}
	n := &criNode{dir: dir, sock: filepath.Join(dir, "run", "c.sock"), config: filepath.Join(dir, "etc", "config.toml"),
		hostsDir: filepath.Join(dir, "certs.d"), ctrBin: filepath.Join(ctrdDir, "ctr")}
	for _, d := range []string{"run", "etc", "cni/bin", "cni/net.d", "logs"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	runc, err := exec.LookPath("runc")
	if err != nil {
		testenv.Missing(t, "runc not installed", "apt-get install runc; tools/test-setup.sh does as root")
	}
	cfg, err := cripod.Config{Dir: dir, Socket: n.sock, HostsDir: n.hostsDir, Runc: runc, SandboxImage: criSandboxImage,
		Snapshotter: "native", NoDevHandler: criNoDevHandler}.Render()
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, n.config, cfg)

	n.daemon = filepath.Join(ctrdDir, "containerd")
	n.startDaemon(t)
	t.Cleanup(func() {
		n.stop(t)
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "containerd.log"))
			t.Logf("--- containerd log (%s) ---\n%s", dir, testproc.LastLines(string(b), 60))
		}
		// Mounts left by a failed run would keep the folder from going away.
		unmountUnder(dir)
		os.RemoveAll(dir)
	})

	n.cri, err = cripod.Dial(n.sock)
	if err != nil {
		t.Fatal(err)
	}
	n.rt, n.img = n.cri.RT, n.cri.Img
	n.waitReady(t)
	return n
}

func (n *criNode) startDaemon(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(filepath.Join(n.dir, "containerd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	n.cmd = exec.Command(n.daemon, "--config", n.config)
	// The daemon finds its shim (containerd-shim-runc-v2) on PATH.
	n.cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(n.daemon)+":"+os.Getenv("PATH"))
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	n.done = done
	cmd := n.cmd
	go func() { cmd.Wait(); logf.Close(); close(done) }()
}

// waitReady waits until the CRI runtime reports ready.
func (n *criNode) waitReady(t *testing.T) {
	t.Helper()
	ctrdWaitFor(t, 60*time.Second, "containerd's CRI answers on "+n.sock, func() bool {
		return n.cri.Ready(context.Background()) == nil
	})
}

// restartDaemon stops and starts containerd; the containers keep running
// under their shims, as on a node whose containerd is upgraded.
func (n *criNode) restartDaemon(t *testing.T) {
	t.Helper()
	n.stopDaemon()
	n.startDaemon(t)
	n.waitReady(t)
}

func (n *criNode) stopDaemon() {
	select {
	case <-n.done:
		return
	default:
	}
	syscall.Kill(-n.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-n.done:
	case <-time.After(20 * time.Second):
		syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
		<-n.done
	}
}

// stop removes every pod (as a node's drain would) and stops containerd.
func (n *criNode) stop(t *testing.T) {
	if n.cri != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		n.cri.RemoveAll(ctx)
		cancel()
		n.cri.Close()
	}
	n.stopDaemon()
}

func (n *criNode) ctx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// importLayout imports the OCI layout at dir into the k8s.io namespace, as
// `ctr images import` of an OCI archive.
func (n *criNode) importLayout(t *testing.T, dir string) {
	t.Helper()
	if err := cripod.ImportLayout(n.ctrBin, n.sock, dir, n.dir, "native"); err != nil {
		t.Fatal(err)
	}
}

// buildPauseLayout builds testdata/pause into a one-layer image named
// criSandboxImage, as an OCI layout under dir.
func buildPauseLayout(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "pause")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "./testdata/pause")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build pause: %v\n%s", err, out)
	}
	out, err := cripod.PauseLayout(bin, dir, criSandboxImage)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// ---------- kubelet's part (internal/cripod), failing the test ----------

// criPod is one pod run through CRI the way kubelet runs it.
type criPod struct {
	*cripod.Pod
	n *criNode
}

func (n *criNode) runPod(t *testing.T, name string, spec corev1.PodSpec, nodeIP, handler string) *criPod {
	t.Helper()
	p, err := n.cri.RunPod(n.ctx(t, 2*time.Minute), name, spec, "cri-node", nodeIP, handler, filepath.Join(n.dir, "logs", name))
	if err != nil {
		t.Fatal(err)
	}
	return &criPod{Pod: p, n: n}
}

// start creates and starts container c (pulling nothing: the image must be
// imported, as with imagePullPolicy IfNotPresent and the image present).
func (p *criPod) start(t *testing.T, c corev1.Container) string {
	t.Helper()
	id, err := p.Start(p.n.ctx(t, time.Minute), c)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func (p *criPod) status(t *testing.T, name string) *runtimeapi.ContainerStatus {
	t.Helper()
	st, err := p.Status(p.n.ctx(t, time.Minute), name)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// runInit runs an init container to completion; kubelet starts the main
// containers only after it exits 0.
func (p *criPod) runInit(t *testing.T, c corev1.Container) {
	t.Helper()
	if err := p.RunInit(p.n.ctx(t, 2*time.Minute), c); err != nil {
		t.Fatal(err)
	}
}

// stop stops a container with the pod's grace period, as kubelet does when
// the pod is deleted.
func (p *criPod) stop(t *testing.T, name string) *runtimeapi.ContainerStatus {
	t.Helper()
	st, err := p.Stop(p.n.ctx(t, p.Grace()+30*time.Second), name, p.Grace())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func (p *criPod) remove(t *testing.T, name string) {
	t.Helper()
	if err := p.Remove(p.n.ctx(t, time.Minute), name); err != nil {
		t.Fatal(err)
	}
}

func (p *criPod) logs(name string) string { return p.Logs(name) }

func (p *criPod) probe(pr *corev1.Probe, c corev1.Container) (int, string, error) {
	return p.Probe(pr, c)
}

// logRecord finds the first JSON log record whose msg is msg.
func logRecord(logs, msg string) map[string]any {
	for _, line := range strings.Split(logs, "\n") {
		var r map[string]any
		if json.Unmarshal([]byte(line), &r) == nil && r["msg"] == msg {
			return r
		}
	}
	return nil
}

// mounted reports whether path is a mount point on the host.
func mounted(t *testing.T, path string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == path {
			return true
		}
	}
	return false
}

// unmountUnder lazily unmounts every mount below dir, deepest first.
func unmountUnder(dir string) {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	var ms []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			ms = append(ms, f[4])
		}
	}
	for i := len(ms) - 1; i >= 0; i-- {
		syscall.Unmount(ms[i], syscall.MNT_DETACH)
	}
}
