package itest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/peerd-project/peerd/internal/ociimage"
	"github.com/peerd-project/peerd/internal/testenv"
	"github.com/peerd-project/peerd/internal/testproc"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestChartPodCRI runs the chart's DaemonSet pod — the image `make image`
// builds, the init container, the main container with its args, env,
// securityContext, hostPath volumes and Bidirectional mount — on a real
// containerd 2.x through CRI, translated from the rendered pod spec the way
// kubelet translates it, and checks from the host what a node depends on.
// No kubelet, API server or CNI: the pod uses the host network, every
// listener is on a loopback address, and nothing reaches outside.
func TestChartPodCRI(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the image and runs containers on containerd")
	}
	testenv.NeedRoot(t, "containerd runs containers, FUSE mounts")
	testenv.NeedFUSE(t)
	ctrdDir := containerd2Dir(t)
	regBin := testenv.LookPath(t, "docker-registry", "docker-registry")
	if _, err := exec.LookPath("make"); err != nil {
		testenv.Missing(t, "make not installed", "apt-get install make")
	}

	imageDir, imageRef := makeImageForCRI(t)
	n := startCRINode(t, ctrdDir)
	n.importLayout(t, imageDir)
	n.importLayout(t, buildPauseLayout(t, t.TempDir()))

	reg := startCtrdRegistry(t, regBin)
	img := makeOCIImage(t, "team/app", "v1", 2<<20, 1<<20+4321)
	reg.push(t, img)
	// The pod bootstraps from a peerd on the host (static mode: there is
	// no API server for k8s-lease).
	boot := startP2PNode(t)

	nodeIP := NextIP()
	good := chartPodValues{
		image: imageRef, nodeIP: nodeIP, httpPort: FreePort(t, "127.0.0.1"),
		p2pPort: FreePort(t, nodeIP), peerPort: FreePort(t, nodeIP),
		registry: "http://" + reg.Host, boot: boot.P2PAddr,
		dataDir: filepath.Join(n.dir, "var-lib-peerd"), mountPath: sharedMountDir(t, filepath.Join(n.dir, "peerd")),
		socket: n.sock, hostsDir: n.hostsDir, configFile: n.config,
	}
	spec := chartPodSpec(t, good)
	if len(spec.InitContainers) != 1 || len(spec.Containers) != 1 {
		t.Fatalf("pod has %d init containers and %d containers, want 1 and 1", len(spec.InitContainers), len(spec.Containers))
	}
	main := spec.Containers[0]
	pod := n.runPod(t, "peerd-a", spec, nodeIP, "")

	// The init container writes hosts.toml through its hostPath.
	pod.runInit(t, spec.InitContainers[0])
	hostsToml := filepath.Join(n.hostsDir, reg.Host, "hosts.toml")
	b, err := os.ReadFile(hostsToml)
	if err != nil {
		t.Fatalf("the init container wrote no %s: %v\n%s", hostsToml, err, pod.logs(spec.InitContainers[0].Name))
	}
	mirror := fmt.Sprintf("http://127.0.0.1:%d", good.httpPort)
	if !strings.Contains(string(b), mirror) {
		t.Fatalf("%s does not send pulls to the mirror %s:\n%s", hostsToml, mirror, b)
	}

	// The probes pass, asked as kubelet asks them.
	pod.start(t, main)
	waitProbe(t, pod, main, main.ReadinessProbe, "readiness", 200)
	if code, body, err := pod.probe(main.LivenessProbe, main); err != nil || code != 200 {
		t.Fatalf("liveness probe: %d %q %v", code, body, err)
	}
	peerd := &Node{t: t, Name: "peerd in the pod", HTTPAddr: fmt.Sprintf("127.0.0.1:%d", good.httpPort)}
	ctrdWaitFor(t, 60*time.Second, "the containerised peerd connects to containerd through the socket's folder", func() bool {
		return peerd.Metric(t, "peerd_containerd_connected") == 1
	})
	ctrdWaitFor(t, 60*time.Second, "the containerised peerd finds containerd consults its mirror", func() bool {
		return peerd.Metric(t, "peerd_containerd_mirror_configured") == 1
	})

	// The same containerd pulls through the containerised peerd.
	reg.reset()
	before := peerd.Metric(t, "peerd_oci_responses_total", "kind=blob")
	if _, err := n.img.PullImage(n.ctx(t, 3*time.Minute), &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: reg.Host + "/team/app:v1"}}); err != nil {
		t.Fatalf("CRI PullImage: %v\n%s", err, testproc.LastLines(pod.logs(main.Name), 20))
	}
	served := peerd.Metric(t, "peerd_oci_responses_total", "kind=blob") - before
	t.Logf("CRI pull of %s: peerd's mirror answered %v blob requests; registry blob bytes %d", reg.Host+"/team/app:v1", served, reg.blobBytes.Load())
	if served < float64(len(img.layerDigests)+1) {
		t.Fatalf("the pull did not go through the containerised peerd: %v blob responses, want %d", served, len(img.layerDigests)+1)
	}

	// A layer reads correctly through the FUSE mount, on the host.
	layer := img.layerDigests[0]
	fusePath := filepath.Join(good.mountPath, "blobs", "sha256", strings.TrimPrefix(layer, "sha256:"))
	var got []byte
	ctrdWaitFor(t, 60*time.Second, "the blob filesystem shows "+fusePath+" on the host", func() bool {
		got, err = os.ReadFile(fusePath)
		return err == nil
	})
	if Digest(got) != layer {
		t.Fatalf("%s on the host: %d bytes, digest %s, want %s", fusePath, len(got), Digest(got), layer)
	}

	// containerd restarts under the running pod, as in an upgrade: it
	// replaces its socket, and peerd reconnects through the socket's folder.
	reconnects := peerd.Metric(t, "peerd_containerd_reconnects_total")
	n.restartDaemon(t)
	if s := pod.status(t, main.Name); s.State != runtimeapi.ContainerState_CONTAINER_RUNNING {
		t.Fatalf("peerd's container is %v after the containerd restart", s.State)
	}
	ctrdWaitFor(t, 60*time.Second, "the containerised peerd reconnects to the restarted containerd", func() bool {
		return peerd.Metric(t, "peerd_containerd_reconnects_total") > reconnects && peerd.Metric(t, "peerd_containerd_connected") == 1
	})

	// Stop as kubelet does with the pod's grace period: peerd exits by
	// itself, unmounts, and the next start finds its cache.
	st := pod.stop(t, main.Name)
	t.Logf("stop: exit code %d, reason %s, after %v", st.ExitCode, st.Reason, time.Duration(st.FinishedAt-st.StartedAt))
	if st.ExitCode != 0 {
		t.Fatalf("peerd did not stop within the grace period by itself: exit %d (%s)\n%s", st.ExitCode, st.Reason, testproc.LastLines(pod.logs(main.Name), 20))
	}
	if mounted(t, filepath.Join(good.mountPath, "blobs")) {
		t.Fatal("the blob filesystem is still mounted on the host after the container stopped")
	}
	if !strings.Contains(pod.logs(main.Name), "unmounted blob filesystem") {
		t.Fatalf("no unmount in the log:\n%s", testproc.LastLines(pod.logs(main.Name), 20))
	}
	pod.remove(t, main.Name)
	pod.start(t, main)
	waitProbe(t, pod, main, main.ReadinessProbe, "readiness after a restart", 200)
	loaded := logRecord(pod.logs(main.Name), "cache loaded")
	if loaded == nil || loaded["blobs"] == nil || loaded["blobs"].(float64) < 1 {
		t.Fatalf("the restarted peerd found no cache: %v\n%s", loaded, testproc.LastLines(pod.logs(main.Name), 20))
	}
	t.Logf("restart: cache loaded with %v blobs, %v bytes", loaded["blobs"], loaded["bytes"])
	got, err = os.ReadFile(fusePath)
	if err != nil || Digest(got) != layer {
		t.Fatalf("%s after the restart: %v, digest %s", fusePath, err, Digest(got))
	}
	if st := pod.stop(t, main.Name); st.ExitCode != 0 || mounted(t, filepath.Join(good.mountPath, "blobs")) {
		t.Fatalf("second stop: exit %d, still mounted %v", st.ExitCode, mounted(t, filepath.Join(good.mountPath, "blobs")))
	}

	// Bad input: a node without /dev/fuse (the nodev runtime gives the
	// privileged container none of the host's devices) and a containerd
	// socket path where nothing listens. The container starts and keeps
	// running, /readyz says why it is not ready, and the log says what to fix.
	badIP := NextIP()
	bad := good
	bad.nodeIP, bad.httpPort, bad.p2pPort, bad.peerPort = badIP, FreePort(t, "127.0.0.1"), FreePort(t, badIP), FreePort(t, badIP)
	bad.dataDir = filepath.Join(n.dir, "var-lib-peerd-bad")
	bad.mountPath = sharedMountDir(t, filepath.Join(n.dir, "peerd-bad"))
	bad.socket = filepath.Join(n.dir, "nosuch", "containerd.sock")
	bspec := chartPodSpec(t, bad)
	bpod := n.runPod(t, "peerd-bad", bspec, badIP, criNoDevHandler)
	bpod.runInit(t, bspec.InitContainers[0])
	bmain := bspec.Containers[0]
	bpod.start(t, bmain)
	waitProbe(t, bpod, bmain, bmain.LivenessProbe, "liveness without /dev/fuse and containerd", 200)
	code, body, err := bpod.probe(bmain.ReadinessProbe, bmain)
	if err != nil || code != 503 || !strings.Contains(body, "blob filesystem not mounted") || !strings.Contains(body, "no /dev/fuse") || !strings.Contains(body, "fix:") {
		t.Fatalf("readiness without /dev/fuse: %d %q %v, want 503 naming the blob filesystem and the fix", code, body, err)
	}
	if !strings.Contains(body, "containerd not reached") || !strings.Contains(body, bad.socket) {
		t.Fatalf("readiness without containerd: %q, want the socket named", body)
	}
	t.Logf("readiness without /dev/fuse: %d %s", code, strings.TrimSpace(body))
	if s := bpod.status(t, bmain.Name); s.State != runtimeapi.ContainerState_CONTAINER_RUNNING {
		t.Fatalf("the container is %v, want running", s.State)
	}
	logs := bpod.logs(bmain.Name)
	if r := logRecord(logs, "blob filesystem unavailable; the other faces keep serving"); r == nil || !strings.Contains(fmt.Sprint(r["err"]), "fuse") {
		t.Fatalf("the log does not say the mount failed and what to fix:\n%s", testproc.LastLines(logs, 30))
	}
	ctrdWaitFor(t, 30*time.Second, "the log names the missing containerd socket and the fix", func() bool {
		logs = bpod.logs(bmain.Name)
		return strings.Contains(logs, bad.socket) && strings.Contains(logs, "start containerd, or pass the socket it listens on")
	})
	// The other faces work: the mirror answers from what the peers hold.
	if code, _, _ := Get(t, "GET", fmt.Sprintf("http://127.0.0.1:%d/v2/", bad.httpPort), nil); code != 200 {
		t.Fatalf("/v2/ of the degraded node: %d", code)
	}
	if st := bpod.stop(t, bmain.Name); st.ExitCode != 0 {
		t.Fatalf("degraded peerd stop: exit %d\n%s", st.ExitCode, testproc.LastLines(bpod.logs(bmain.Name), 20))
	}
}

// chartPodValues are the test's chart values: every listener on loopback
// on a free port, every host path under the test's folder.
type chartPodValues struct {
	image                        string
	nodeIP                       string
	httpPort, p2pPort, peerPort  int
	registry, boot               string
	dataDir, mountPath           string
	socket, hostsDir, configFile string
}

func chartPodSpec(t *testing.T, v chartPodValues) corev1.PodSpec {
	t.Helper()
	i := strings.LastIndex(v.image, ":")
	repo, tag := v.image[:i], v.image[i+1:]
	values := fmt.Sprintf(`image:
  repository: %s
  tag: %q
registries: [%q]
http:
  port: %d
p2p:
  port: %d
  peerPort: %d
bootstrap:
  mode: static
  static: [%q]
cache:
  size: 1GiB
  hostPath: %s
mount:
  path: %s
containerd:
  socket: %s
  hostsDir: %s
  configFile: %s
log:
  level: debug
`, repo, tag, v.registry, v.httpPort, v.p2pPort, v.peerPort, v.boot, v.dataDir, v.mountPath, v.socket, v.hostsDir, v.configFile)
	for _, o := range renderChart(t, values) {
		if ds, ok := o.obj.(*appsv1.DaemonSet); ok && o.u.GetAnnotations()["helm.sh/hook"] == "" {
			return ds.Spec.Template.Spec
		}
	}
	t.Fatal("the chart rendered no DaemonSet")
	return corev1.PodSpec{}
}

// waitProbe runs a probe every periodSeconds until it answers want.
func waitProbe(t *testing.T, p *criPod, c corev1.Container, pr *corev1.Probe, what string, want int) {
	t.Helper()
	var code int
	var body string
	var err error
	period := time.Duration(max(pr.PeriodSeconds, 1)) * time.Second
	deadline := time.Now().Add(2 * time.Minute)
	for {
		code, body, err = p.probe(pr, c)
		if err == nil && code == want {
			return
		}
		if s := p.status(t, c.Name); s.State == runtimeapi.ContainerState_CONTAINER_EXITED {
			t.Fatalf("%s: the container exited %d (%s)\n%s", what, s.ExitCode, s.Reason, testproc.LastLines(p.logs(c.Name), 30))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s probe: %d %q %v, want %d\n%s", what, code, body, err, want, testproc.LastLines(p.logs(c.Name), 30))
		}
		time.Sleep(min(period, time.Second))
	}
}

// sharedMountDir makes dir a shared mount point, as / is on a systemd node:
// containerd accepts a Bidirectional mount only from a shared mount.
func sharedMountDir(t *testing.T, dir string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount(dir, dir, "", syscall.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s: %v", dir, err)
	}
	t.Cleanup(func() { unmountUnder(dir) })
	if err := syscall.Mount("", dir, "", syscall.MS_SHARED|syscall.MS_REC, ""); err != nil {
		t.Fatalf("make %s shared: %v", dir, err)
	}
	return dir
}

// containerd2Dir is the folder of the containerd 2.x build with its runc shim.
func containerd2Dir(t *testing.T) string {
	t.Helper()
	for _, b := range containerdBuilds(t) {
		if !strings.HasSuffix(b.name, "2.x") {
			continue
		}
		if b.daemon == "" {
			testenv.Missing(t, b.missing, b.how)
		}
		dir := filepath.Dir(b.daemon)
		if _, err := os.Stat(filepath.Join(dir, "containerd-shim-runc-v2")); err != nil {
			testenv.Missing(t, "containerd-shim-runc-v2 not built in "+dir, "bash tools/containerd2.sh; tools/test-setup.sh does")
		}
		return dir
	}
	t.Fatal("no containerd 2.x build listed")
	return ""
}

// makeImageForCRI runs `make image` for this machine's platform into
// bin/image-cri and returns the layout and the image reference it names.
func makeImageForCRI(t *testing.T) (string, string) {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(root, "bin", "image-cri")
	cmd := exec.Command("make", "-C", root, "image", "IMAGE_PLATFORMS=linux/"+runtime.GOARCH, "IMAGE_OUT="+out, "IMAGE=")
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Run(); err != nil {
		t.Fatalf("make image: %v\n%s", err, buf.String())
	}
	lp, err := layout.FromPath(out)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		t.Fatalf("make image wrote %v (%v), want one index", im, err)
	}
	ref := im.Manifests[0].Annotations[ociimage.RefNameAnnotation]
	if ref == "" {
		t.Fatal("make image names no image in index.json")
	}
	return out, ref
}
