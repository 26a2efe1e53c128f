package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/peerd-project/peerd/internal/cripod"
	"github.com/peerd-project/peerd/internal/testproc"
	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// One node of the cluster (the last one on containerd 2.x) runs peerd as
// the Helm chart's DaemonSet pod, through its own containerd's CRI plugin,
// as a Kubernetes node would; the others run peerd as a process. The pod
// translation is kubelet's part in internal/cripod, shared with itest's
// TestChartPodCRI.

// criSandboxImage is the pause image the harness builds and imports; the
// CRI plugin uses it for the pod sandbox and never pulls it.
const criSandboxImage = "peerd.invalid/pause:e2e"

// peerdContainer is the chart's container that runs peerd.
const peerdContainer = "peerd"

// peerdInstance is a node's peerd, whatever runs it: a process (procPeerd)
// or the chart's container on the node's containerd (criPeerd).
type peerdInstance interface {
	Running() bool
	// Stop sends SIGTERM and SIGKILL after grace.
	Stop(grace time.Duration) error
	// Kill sends SIGKILL at once.
	Kill() error
	// Logs is the log of the current run (of the latest container attempt).
	Logs() string
	Tail(n int) string
}

var (
	_ peerdInstance = procPeerd{}
	_ peerdInstance = (*criPeerd)(nil)
)

// procPeerd is peerd run as a process in the node's network namespace.
type procPeerd struct{ p *testproc.Proc }

func (x procPeerd) Running() bool { return x.p.Running() }

func (x procPeerd) Stop(grace time.Duration) error { x.p.Stop(grace); return nil }

func (x procPeerd) Kill() error { x.p.Kill(); return nil }

func (x procPeerd) Logs() string {
	b, err := os.ReadFile(x.p.Log)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

func (x procPeerd) Tail(n int) string { return x.p.Tail(n) }

// criPeerd is the chart's peerd container on the node's containerd. Every
// start is a new attempt of the container, as kubelet restarts one.
type criPeerd struct {
	pod  *cripod.Pod
	main corev1.Container
}

func criCtx(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

func (x *criPeerd) Running() bool {
	ctx, cancel := criCtx(10 * time.Second)
	defer cancel()
	st, err := x.pod.Status(ctx, peerdContainer)
	return err == nil && st.State == runtimeapi.ContainerState_CONTAINER_RUNNING
}

func (x *criPeerd) Stop(grace time.Duration) error {
	ctx, cancel := criCtx(grace + time.Minute)
	defer cancel()
	_, err := x.pod.Stop(ctx, peerdContainer, grace)
	return err
}

// Kill is StopContainer with no grace: the CRI plugin sends SIGKILL at once.
func (x *criPeerd) Kill() error { return x.Stop(0) }

func (x *criPeerd) Logs() string { return x.pod.Logs(peerdContainer) }

func (x *criPeerd) Tail(n int) string { return testproc.LastLines(x.Logs(), n) }

// start removes the previous attempt, if any, and starts the next one.
func (x *criPeerd) start() error {
	ctx, cancel := criCtx(2 * time.Minute)
	defer cancel()
	if st, err := x.pod.Status(ctx, peerdContainer); err == nil {
		if st.State == runtimeapi.ContainerState_CONTAINER_RUNNING {
			return fmt.Errorf("peerd's container is still running")
		}
		if err := x.pod.Remove(ctx, peerdContainer); err != nil {
			return err
		}
	}
	_, err := x.pod.Start(ctx, x.main)
	return err
}

// criAssets are what the containerised node needs besides containerd:
// the image of `make image`, the pause image and helm to render the chart.
type criAssets struct {
	imageDir, imageRef string // OCI layout and the reference it names
	pauseDir           string // OCI layout of criSandboxImage
	helm               string
	runc               string
	shimDir            string // containerd 2.x's folder, with containerd-shim-runc-v2
}

// criNodeIndex is the 1-based index of the containerised node: the last
// node on containerd 2.x, a follower in every scenario (not node 1, which
// seeds, nor node 2, the other bootstrap peer), and the node the chaos
// scenarios stop and restart.
func criNodeIndex(cfg config) int { return cfg.Nodes - cfg.Containerd16 }

// prepareCRI builds or finds the assets of the containerised node. E2E_IMAGE
// names a layout of `make image` (make e2e passes bin/image); without it
// the harness runs make image for this machine's platform.
func (c *cluster) prepareCRI(ctx context.Context) error {
	a := &c.cri
	var err error
	if a.runc, err = exec.LookPath("runc"); err != nil {
		return errors.New("runc not installed (apt-get install runc; tools/test-setup.sh does): the containerised node needs it")
	}
	a.shimDir = filepath.Dir(c.bin.ctrd2)
	if _, err := os.Stat(filepath.Join(a.shimDir, "containerd-shim-runc-v2")); err != nil {
		return fmt.Errorf("containerd-shim-runc-v2 not built in %s (bash tools/containerd2.sh)", a.shimDir)
	}
	work := filepath.Join(c.dir, "cri")
	if err := os.MkdirAll(work, 0o755); err != nil {
		return err
	}
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	a.imageDir = os.Getenv("E2E_IMAGE")
	if a.imageDir == "" {
		a.imageDir = filepath.Join(work, "image")
		out, err := shTimeout(ctx, 10*time.Minute, "make", "-C", "..", "image", "GO="+goBin, "IMAGE_PLATFORMS=linux/"+runtime.GOARCH, "IMAGE_OUT="+a.imageDir, "IMAGE=")
		if err != nil {
			return fmt.Errorf("make image: %w\n%s", err, out)
		}
	}
	if a.imageRef, err = layoutRef(a.imageDir); err != nil {
		return err
	}
	pause := filepath.Join(work, "pause-bin")
	if out, err := shTimeout(ctx, 5*time.Minute, "env", "CGO_ENABLED=0", goBin, "build", "-trimpath", "-o", pause, "../itest/testdata/pause"); err != nil {
		return fmt.Errorf("build the pause binary: %w\n%s", err, out)
	}
	if a.pauseDir, err = cripod.PauseLayout(pause, work, criSandboxImage); err != nil {
		return err
	}
	out, err := shTimeout(ctx, 30*time.Minute, "bash", "../tools/k8s/build.sh")
	if err != nil {
		return fmt.Errorf("tools/k8s/build.sh (helm): %w", err)
	}
	a.helm = filepath.Join(lastLine(out), "helm")
	return nil
}

// layoutRef is the image reference index.json of an OCI layout names.
func layoutRef(dir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil {
		return "", fmt.Errorf("the image of make image: %w", err)
	}
	var idx struct {
		Manifests []struct {
			Annotations map[string]string `json:"annotations"`
		} `json:"manifests"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return "", fmt.Errorf("%s/index.json: %w", dir, err)
	}
	for _, m := range idx.Manifests {
		if r := m.Annotations["org.opencontainers.image.ref.name"]; r != "" {
			return r, nil
		}
	}
	return "", fmt.Errorf("%s/index.json names no image", dir)
}

// criContainerdConfig is the containerised node's containerd config: the
// CRI plugin on, runc with its state under the node's folder.
func (c *cluster) criContainerdConfig(n *node, cd string) (string, error) {
	for _, d := range []string{"cni/bin", "cni/net.d"} {
		if err := os.MkdirAll(filepath.Join(cd, d), 0o755); err != nil {
			return "", err
		}
	}
	return cripod.Config{Dir: cd, Socket: n.sock, HostsDir: n.hostsDir, Runc: c.cri.runc,
		SandboxImage: criSandboxImage, Snapshotter: c.cfg.Snapshotter}.Render()
}

// criContainerdArgs: nsenter, not ip netns exec, as for peerd: containerd
// (and the shims and containers it starts) join only the node's network
// namespace, so the pod's Bidirectional mount reaches the host's mount
// namespace as on a real node.
func (c *cluster) criContainerdArgs(n *node, cfgFile string) []string {
	return []string{"nsenter", "--net=/run/netns/" + n.ns, "--", n.ctrd, "--config", cfgFile}
}

// criEnv is the containerd's environment: it finds its runc shim on PATH.
func (c *cluster) criEnv() []string {
	return append(cleanEnv(), "PATH="+c.cri.shimDir+":"+os.Getenv("PATH"))
}

// criImport puts the pause image and peerd's image into the node's
// containerd and connects its CRI client.
func (c *cluster) criImport(ctx context.Context, n *node) error {
	for _, dir := range []string{c.cri.pauseDir, c.cri.imageDir} {
		if err := cripod.ImportLayout(n.ctr, n.sock, dir, filepath.Join(n.dir, "containerd"), c.cfg.Snapshotter); err != nil {
			return fmt.Errorf("%s: %w", n.name(), err)
		}
	}
	cl, err := cripod.Dial(n.sock)
	if err != nil {
		return err
	}
	n.cri = cl
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	return testproc.Poll(wctx, 250*time.Millisecond, n.containerd.Done(), cl.Ready)
}

// criValues are the chart's values for node n: its address, the cluster's
// ports and registry, its data folder, mount, hosts folder and containerd.
func (c *cluster) criValues(n *node) string {
	i := strings.LastIndex(c.cri.imageRef, ":")
	repo, tag := c.cri.imageRef[:i], c.cri.imageRef[i+1:]
	var boot []string
	for _, b := range c.nodes[:2] {
		boot = append(boot, strconv.Quote(fmt.Sprintf("/ip4/%s/tcp/%d/p2p/%s", b.ip, p2pPort, b.peerID)))
	}
	reg := registryID
	if c.hasFlag("pull-through") {
		reg = "http://" + registryID
	}
	_, httpPort, _ := strings.Cut(peerdHTTP, ":")
	return fmt.Sprintf(`image:
  repository: %s
  tag: %q
  pullPolicy: IfNotPresent
registries: [%q]
upstreamAllow: [%q, %q]
http:
  port: %s
p2p:
  port: %d
bootstrap:
  mode: static
  static: [%s]
cache:
  size: %dMiB
  chunkSize: %s
  hostPath: %s
mount:
  path: %s
containerd:
  socket: %s
  namespace: %s
  hostsDir: %s
  configFile: %s
log:
  level: %s
`, repo, tag, reg, originIP+":"+filePort, registryID, httpPort, p2pPort, strings.Join(boot, ", "),
		peerdCacheSize(c.cfg)>>20, c.cfg.ChunkSize, filepath.Join(n.dir, "data"), filepath.Join(n.dir, "mnt"),
		n.sock, ctrdNS, n.hostsDir, filepath.Join(n.dir, "containerd", "config.toml"), c.cfg.LogLevel)
}

// startPeerdCRI starts the containerised node's peerd: the first time the
// pod (sandbox and init container, which writes the hosts folder again),
// then a new attempt of the peerd container.
func (c *cluster) startPeerdCRI(n *node) error {
	if len(n.extra) > 0 {
		return fmt.Errorf("%s runs the chart's pod: extra peerd flags %q need chart values, not flags", n.name(), n.extra)
	}
	if x, ok := n.peerd.(*criPeerd); ok {
		return x.start()
	}
	mnt := filepath.Join(n.dir, "mnt")
	if err := sharedMount(mnt); err != nil {
		return err
	}
	n.mount = filepath.Join(mnt, "blobs") // the chart mounts at mount.path/blobs
	work := filepath.Join(n.dir, "chart")
	if err := os.MkdirAll(work, 0o755); err != nil {
		return err
	}
	spec, err := cripod.ChartPod(c.cri.helm, "../deploy/helm/peerd", c.criValues(n), work)
	if err != nil {
		return fmt.Errorf("%s: %w", n.name(), err)
	}
	if len(spec.Containers) != 1 || spec.Containers[0].Name != peerdContainer {
		return fmt.Errorf("%s: the chart's pod has containers %v, want one named %s", n.name(), spec.Containers, peerdContainer)
	}
	ctx, cancel := criCtx(3 * time.Minute)
	defer cancel()
	pod, err := n.cri.RunPod(ctx, "peerd-"+n.name(), spec, n.name(), n.ip, "", filepath.Join(n.dir, "pod-logs"))
	if err != nil {
		return fmt.Errorf("%s: %w", n.name(), err)
	}
	for _, ic := range spec.InitContainers {
		if err := pod.RunInit(ctx, ic); err != nil {
			return fmt.Errorf("%s: %w", n.name(), err)
		}
	}
	x := &criPeerd{pod: pod, main: spec.Containers[0]}
	n.peerd = x
	return x.start()
}

// sharedMount makes dir a shared mount point, as / is on a systemd node:
// containerd accepts a Bidirectional mount only from a shared mount.
func sharedMount(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := syscall.Mount(dir, dir, "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s: %w", dir, err)
	}
	if err := syscall.Mount("", dir, "", syscall.MS_SHARED|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("make %s shared: %w", dir, err)
	}
	return nil
}

// stopCRI stops the containerised peerd with the pod's grace period (so it
// unmounts its blob filesystem) and removes the pod, before containerd stops.
func (c *cluster) stopCRI(n *node) {
	if n.cri == nil {
		return
	}
	if x, ok := n.peerd.(*criPeerd); ok && x.Running() {
		x.Stop(x.pod.Grace())
	}
	ctx, cancel := criCtx(time.Minute)
	defer cancel()
	n.cri.RemoveAll(ctx)
	n.cri.Close()
}

// criKeeps reports whether ref is an image the containerised node runs
// (peerd's or the pause image), which the cleanup between scenarios keeps.
func (c *cluster) criKeeps(ref string) bool {
	for _, keep := range []string{c.cri.imageRef, criSandboxImage} {
		repo := keep[:strings.LastIndex(keep, ":")]
		if ref == keep || strings.HasPrefix(ref, repo+"@") {
			return true
		}
	}
	return false
}

// checkCRINode proves the containerised node runs as described: CRI reports
// the chart's peerd container running from peerd's image, that peerd
// reaches its containerd and consults its mirror, and its blob filesystem
// is mounted in the host's mount namespace (the Bidirectional mount).
func (c *cluster) checkCRINode(n *node) error {
	x, ok := n.peerd.(*criPeerd)
	if !ok {
		return fmt.Errorf("%s: peerd is not a CRI container", n.name())
	}
	ctx, cancel := criCtx(time.Minute)
	defer cancel()
	st, err := x.pod.Status(ctx, peerdContainer)
	if err != nil {
		return fmt.Errorf("%s: %w", n.name(), err)
	}
	if st.State != runtimeapi.ContainerState_CONTAINER_RUNNING || st.GetImage().GetImage() != c.cri.imageRef {
		return fmt.Errorf("%s: CRI reports container %s %v with image %s, want running with %s", n.name(), peerdContainer, st.State, st.GetImage().GetImage(), c.cri.imageRef)
	}
	for _, m := range []string{"peerd_containerd_connected", "peerd_containerd_mirror_configured"} {
		var v float64
		for range 60 {
			if v, err = c.metric(n, m, ""); err == nil && v == 1 {
				break
			}
			time.Sleep(time.Second)
		}
		if v != 1 {
			return fmt.Errorf("%s: the containerised peerd's %s is %v (%v), want 1\n%s", n.name(), m, v, err, x.Tail(20))
		}
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 4 && unescapeMount(f[4]) == n.mount {
			c.t.Logf("e2e: %s runs peerd as the chart's pod through its containerd's CRI (container %.12s, image %s); its blob filesystem %s is mounted on the host",
				n.name(), st.Id, c.cri.imageRef, n.mount)
			return nil
		}
	}
	return fmt.Errorf("%s: the containerised peerd's blob filesystem %s is not mounted in the host's mount namespace\n%s", n.name(), n.mount, x.Tail(20))
}
