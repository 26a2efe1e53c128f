package itest

import (
	"archive/tar"
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/peerd-project/peerd/internal/testenv"
	"github.com/peerd-project/peerd/internal/testproc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// A containerd 2.x with its CRI plugin, and the part of kubelet that turns a
// pod spec into CRI calls: enough to run the chart's DaemonSet pod as a node
// would, with no kubelet, API server or CNI.

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
	conn     *grpc.ClientConn
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
	// runc keeps its state under dir (Root), apart from a node's containerd.
	// Host network needs no CNI plugin; the CRI plugin still wants its
	// folders, which stay empty here.
	cfg := fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.nri.v1.nri"]
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
# ctr's import goes through the transfer service, which unpacks only for
# the snapshotters it is configured for.
[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/%[12]s"
    snapshotter = "native"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "native"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = %[6]q
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = %[7]q
[plugins."io.containerd.cri.v1.runtime"]
  # Never below containerd's own OOM score: a test machine may forbid
  # lowering it (as a node in a container does).
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [%[8]q]
    conf_dir = %[9]q
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = %[10]q
        Root = %[13]q
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.%[11]s]
      runtime_type = "io.containerd.runc.v2"
      privileged_without_host_devices = true
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.%[11]s.options]
        BinaryName = %[10]q
        Root = %[13]q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), n.sock, n.sock+".ttrpc", filepath.Join(dir, "opt"),
		criSandboxImage, n.hostsDir, filepath.Join(dir, "cni/bin"), filepath.Join(dir, "cni/net.d"), runc, criNoDevHandler, runtime.GOARCH, filepath.Join(dir, "runc"))
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

	n.conn, err = grpc.NewClient("unix://"+n.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	n.rt = runtimeapi.NewRuntimeServiceClient(n.conn)
	n.img = runtimeapi.NewImageServiceClient(n.conn)
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
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, err := n.rt.Status(ctx, &runtimeapi.StatusRequest{})
		if err != nil {
			return false
		}
		for _, c := range st.GetStatus().GetConditions() {
			if c.Type == runtimeapi.RuntimeReady && !c.Status {
				return false
			}
		}
		return true
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
	if n.rt != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if l, err := n.rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{}); err == nil {
			for _, p := range l.Items {
				n.rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: p.Id})
				n.rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.Id})
			}
		}
		cancel()
		n.conn.Close()
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
	archive := filepath.Join(n.dir, filepath.Base(dir)+".tar")
	tarDir(t, dir, archive)
	out, err := exec.Command(n.ctrBin, "--address", n.sock, "--namespace", "k8s.io", "images", "import",
		"--platform", "linux/"+runtime.GOARCH, "--snapshotter", "native", archive).CombinedOutput()
	if err != nil {
		t.Fatalf("ctr images import %s: %v\n%s", archive, err, out)
	}
}

// tarDir writes the files under dir as a tar (an OCI archive of a layout).
func tarDir(t *testing.T, dir, out string) {
	t.Helper()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		h, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		h.Name = filepath.ToSlash(rel)
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		src, err := os.Open(p)
		if err != nil {
			return err
		}
		defer src.Close()
		_, err = io.Copy(tw, src)
		return err
	})
	if err == nil {
		err = tw.Close()
	}
	if err != nil {
		t.Fatalf("tar %s: %v", dir, err)
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
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		pr, pw := io.Pipe()
		go func() {
			tw := tar.NewWriter(pw)
			tw.WriteHeader(&tar.Header{Name: "pause", Mode: 0o755, Size: int64(len(data)), Typeflag: tar.TypeReg})
			tw.Write(data)
			pw.CloseWithError(tw.Close())
		}()
		return pr, nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON), layer)
	if err == nil {
		var cf *v1.ConfigFile
		cf, err = img.ConfigFile()
		if err == nil {
			cf = cf.DeepCopy()
			cf.OS, cf.Architecture = "linux", runtime.GOARCH
			cf.Config.Entrypoint = []string{"/pause"}
			img, err = mutate.ConfigFile(img, cf)
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "pause")
	lp, err := layout.Write(out, empty.Index)
	if err == nil {
		err = lp.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": criSandboxImage}))
	}
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// ---------- kubelet's part ----------

// criPod is one pod run through CRI the way kubelet runs it.
type criPod struct {
	n       *criNode
	spec    corev1.PodSpec
	name    string
	handler string            // runtime handler ("" = default)
	nodeIP  string            // status.hostIP
	logDir  string            // the pod's log folder
	id      string            // sandbox id
	ctrs    map[string]string // container name -> id of its latest attempt
	attempt map[string]uint32
}

func (n *criNode) runPod(t *testing.T, name string, spec corev1.PodSpec, nodeIP, handler string) *criPod {
	t.Helper()
	p := &criPod{n: n, spec: spec, name: name, handler: handler, nodeIP: nodeIP,
		logDir: filepath.Join(n.dir, "logs", name), ctrs: map[string]string{}, attempt: map[string]uint32{}}
	os.MkdirAll(p.logDir, 0o755)
	if !spec.HostNetwork {
		t.Fatal("the test runs host-network pods only: others need CNI")
	}
	resp, err := n.rt.RunPodSandbox(n.ctx(t, 2*time.Minute), &runtimeapi.RunPodSandboxRequest{Config: p.sandboxConfig(), RuntimeHandler: handler})
	if err != nil {
		t.Fatalf("RunPodSandbox %s: %v", name, err)
	}
	p.id = resp.PodSandboxId
	return p
}

func (p *criPod) privileged() bool {
	for _, c := range append(append([]corev1.Container{}, p.spec.InitContainers...), p.spec.Containers...) {
		if c.SecurityContext != nil && c.SecurityContext.Privileged != nil && *c.SecurityContext.Privileged {
			return true
		}
	}
	return false
}

func (p *criPod) namespaces() *runtimeapi.NamespaceOption {
	// hostNetwork: the node's network namespace; pid and ipc of the pod's own.
	return &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE, Pid: runtimeapi.NamespaceMode_CONTAINER, Ipc: runtimeapi.NamespaceMode_POD}
}

func (p *criPod) sandboxConfig() *runtimeapi.PodSandboxConfig {
	return &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: p.name, Uid: p.name + "-uid", Namespace: "peerd"},
		LogDirectory: p.logDir,
		Labels:       map[string]string{"io.kubernetes.pod.name": p.name, "io.kubernetes.pod.namespace": "peerd"},
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: p.namespaces(),
				// A privileged container needs a privileged sandbox.
				Privileged: p.privileged(),
			},
		},
	}
}

// env resolves a container's env the way kubelet fills fieldRef and
// resourceFieldRef; other sources are not used by the chart.
func (p *criPod) env(t *testing.T, c corev1.Container) []*runtimeapi.KeyValue {
	t.Helper()
	var out []*runtimeapi.KeyValue
	for _, e := range c.Env {
		v := e.Value
		switch {
		case e.ValueFrom == nil:
		case e.ValueFrom.FieldRef != nil:
			switch e.ValueFrom.FieldRef.FieldPath {
			case "spec.nodeName":
				v = "cri-node"
			case "status.hostIP", "status.podIP":
				v = p.nodeIP
			case "metadata.namespace":
				v = "peerd"
			case "metadata.name":
				v = p.name
			default:
				t.Fatalf("env %s: fieldRef %s not handled by the test's kubelet", e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
		case e.ValueFrom.ResourceFieldRef != nil:
			r := e.ValueFrom.ResourceFieldRef
			q, ok := c.Resources.Limits[corev1.ResourceName(strings.TrimPrefix(r.Resource, "limits."))]
			if !strings.HasPrefix(r.Resource, "limits.") || !ok {
				t.Fatalf("env %s: resourceFieldRef %s not handled by the test's kubelet", e.Name, r.Resource)
			}
			div := r.Divisor.Value()
			if div == 0 {
				div = 1
			}
			v = fmt.Sprint((q.Value() + div - 1) / div)
		default:
			t.Fatalf("env %s: source not handled by the test's kubelet", e.Name)
		}
		out = append(out, &runtimeapi.KeyValue{Key: e.Name, Value: []byte(v)})
	}
	return out
}

var kubeletVarRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// expand replaces $(VAR) with the container's env, as kubelet does in args.
func expand(s string, env []*runtimeapi.KeyValue) string {
	return kubeletVarRef.ReplaceAllStringFunc(s, func(m string) string {
		name := m[2 : len(m)-1]
		for _, e := range env {
			if e.Key == name {
				return string(e.Value)
			}
		}
		return m
	})
}

// hostPath applies kubelet's hostPath type check (and DirectoryOrCreate's
// create) and returns the path, or the error kubelet would report.
func hostPath(v *corev1.HostPathVolumeSource) (string, error) {
	typ := corev1.HostPathUnset
	if v.Type != nil {
		typ = *v.Type
	}
	st, err := os.Stat(v.Path)
	switch typ {
	case corev1.HostPathUnset:
		return v.Path, nil
	case corev1.HostPathDirectoryOrCreate:
		if os.IsNotExist(err) {
			return v.Path, os.MkdirAll(v.Path, 0o755)
		}
		if err == nil && !st.IsDir() {
			return "", fmt.Errorf("hostPath type check failed: %s is not a directory", v.Path)
		}
		return v.Path, err
	case corev1.HostPathDirectory:
		if err != nil || !st.IsDir() {
			return "", fmt.Errorf("hostPath type check failed: %s is not a directory", v.Path)
		}
	case corev1.HostPathSocket:
		if err != nil || st.Mode()&os.ModeSocket == 0 {
			return "", fmt.Errorf("hostPath type check failed: %s is not a socket file", v.Path)
		}
	case corev1.HostPathCharDev:
		if err != nil || st.Mode()&os.ModeCharDevice == 0 {
			return "", fmt.Errorf("hostPath type check failed: %s is not a character device", v.Path)
		}
	case corev1.HostPathFileOrCreate:
		if os.IsNotExist(err) {
			f, err := os.OpenFile(v.Path, os.O_CREATE, 0o644)
			if err == nil {
				f.Close()
			}
			return v.Path, err
		}
	default:
		if err != nil {
			return "", fmt.Errorf("hostPath type check failed: %s: %v", v.Path, err)
		}
	}
	return v.Path, nil
}

// mounts translates volumeMounts: hostPath volumes only (what the chart's
// pod uses when no Secret is set), Bidirectional as rshared, HostToContainer
// as rslave, None as private.
func (p *criPod) mounts(t *testing.T, c corev1.Container) []*runtimeapi.Mount {
	t.Helper()
	vols := map[string]corev1.Volume{}
	for _, v := range p.spec.Volumes {
		vols[v.Name] = v
	}
	var out []*runtimeapi.Mount
	for _, m := range c.VolumeMounts {
		v, ok := vols[m.Name]
		if !ok {
			t.Fatalf("container %s mounts volume %s, which the pod does not have", c.Name, m.Name)
		}
		if v.HostPath == nil {
			t.Fatalf("volume %s is not a hostPath: not handled by the test's kubelet", m.Name)
		}
		src, err := hostPath(v.HostPath)
		if err != nil {
			t.Fatalf("kubelet would not start container %s: volume %s: %v", c.Name, m.Name, err)
		}
		prop := runtimeapi.MountPropagation_PROPAGATION_PRIVATE
		if m.MountPropagation != nil {
			switch *m.MountPropagation {
			case corev1.MountPropagationBidirectional:
				prop = runtimeapi.MountPropagation_PROPAGATION_BIDIRECTIONAL
			case corev1.MountPropagationHostToContainer:
				prop = runtimeapi.MountPropagation_PROPAGATION_HOST_TO_CONTAINER
			}
		}
		out = append(out, &runtimeapi.Mount{ContainerPath: m.MountPath, HostPath: filepath.Join(src, m.SubPath), Readonly: m.ReadOnly, Propagation: prop})
	}
	return out
}

func (p *criPod) containerConfig(t *testing.T, c corev1.Container) *runtimeapi.ContainerConfig {
	t.Helper()
	env := p.env(t, c)
	var args, cmd []string
	for _, a := range c.Args {
		args = append(args, expand(a, env))
	}
	for _, a := range c.Command {
		cmd = append(cmd, expand(a, env))
	}
	sc := &runtimeapi.LinuxContainerSecurityContext{NamespaceOptions: p.namespaces()}
	if s := c.SecurityContext; s != nil {
		if s.Privileged != nil {
			sc.Privileged = *s.Privileged
		}
		if s.RunAsUser != nil {
			sc.RunAsUser = &runtimeapi.Int64Value{Value: *s.RunAsUser}
		}
		if s.ReadOnlyRootFilesystem != nil {
			sc.ReadonlyRootfs = *s.ReadOnlyRootFilesystem
		}
		if s.AllowPrivilegeEscalation != nil {
			sc.NoNewPrivs = !*s.AllowPrivilegeEscalation
		}
		if s.Capabilities != nil {
			caps := &runtimeapi.Capability{}
			for _, x := range s.Capabilities.Add {
				caps.AddCapabilities = append(caps.AddCapabilities, string(x))
			}
			for _, x := range s.Capabilities.Drop {
				caps.DropCapabilities = append(caps.DropCapabilities, string(x))
			}
			sc.Capabilities = caps
		}
	}
	res := &runtimeapi.LinuxContainerResources{}
	if q, ok := c.Resources.Limits[corev1.ResourceMemory]; ok {
		res.MemoryLimitInBytes = q.Value()
	}
	if q, ok := c.Resources.Requests[corev1.ResourceCPU]; ok {
		res.CpuShares = max(2, q.MilliValue()*1024/1000)
	}
	p.attempt[c.Name]++
	attempt := p.attempt[c.Name] - 1
	return &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: c.Name, Attempt: attempt},
		Image:    &runtimeapi.ImageSpec{Image: c.Image},
		Command:  cmd,
		Args:     args,
		Envs:     env,
		Mounts:   p.mounts(t, c),
		LogPath:  fmt.Sprintf("%s/%d.log", c.Name, attempt),
		Labels:   map[string]string{"io.kubernetes.container.name": c.Name},
		Linux:    &runtimeapi.LinuxContainerConfig{Resources: res, SecurityContext: sc},
	}
}

// start creates and starts container c (pulling nothing: the image must be
// imported, as with imagePullPolicy IfNotPresent and the image present).
func (p *criPod) start(t *testing.T, c corev1.Container) string {
	t.Helper()
	st, err := p.n.img.ImageStatus(p.n.ctx(t, time.Minute), &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: c.Image}})
	if err != nil || st.Image == nil {
		t.Fatalf("image %s is not in containerd (%v): the test never pulls it", c.Image, err)
	}
	cfg := p.containerConfig(t, c)
	cr, err := p.n.rt.CreateContainer(p.n.ctx(t, time.Minute), &runtimeapi.CreateContainerRequest{PodSandboxId: p.id, Config: cfg, SandboxConfig: p.sandboxConfig()})
	if err != nil {
		t.Fatalf("CreateContainer %s: %v", c.Name, err)
	}
	if _, err := p.n.rt.StartContainer(p.n.ctx(t, time.Minute), &runtimeapi.StartContainerRequest{ContainerId: cr.ContainerId}); err != nil {
		t.Fatalf("StartContainer %s: %v\n%s", c.Name, err, p.logs(c.Name))
	}
	p.ctrs[c.Name] = cr.ContainerId
	return cr.ContainerId
}

func (p *criPod) status(t *testing.T, name string) *runtimeapi.ContainerStatus {
	t.Helper()
	st, err := p.n.rt.ContainerStatus(p.n.ctx(t, time.Minute), &runtimeapi.ContainerStatusRequest{ContainerId: p.ctrs[name]})
	if err != nil {
		t.Fatalf("ContainerStatus %s: %v", name, err)
	}
	return st.Status
}

// runInit runs an init container to completion; kubelet starts the main
// containers only after it exits 0.
func (p *criPod) runInit(t *testing.T, c corev1.Container) {
	t.Helper()
	p.start(t, c)
	ctrdWaitFor(t, 2*time.Minute, "init container "+c.Name+" exits", func() bool {
		return p.status(t, c.Name).State == runtimeapi.ContainerState_CONTAINER_EXITED
	})
	if st := p.status(t, c.Name); st.ExitCode != 0 {
		t.Fatalf("init container %s exited %d (%s %s)\n%s", c.Name, st.ExitCode, st.Reason, st.Message, p.logs(c.Name))
	}
}

// stop stops a container with the pod's grace period, as kubelet does when
// the pod is deleted.
func (p *criPod) stop(t *testing.T, name string) *runtimeapi.ContainerStatus {
	t.Helper()
	grace := int64(30)
	if p.spec.TerminationGracePeriodSeconds != nil {
		grace = *p.spec.TerminationGracePeriodSeconds
	}
	if _, err := p.n.rt.StopContainer(p.n.ctx(t, time.Duration(grace+30)*time.Second), &runtimeapi.StopContainerRequest{ContainerId: p.ctrs[name], Timeout: grace}); err != nil {
		t.Fatalf("StopContainer %s: %v", name, err)
	}
	return p.status(t, name)
}

func (p *criPod) remove(t *testing.T, name string) {
	t.Helper()
	if _, err := p.n.rt.RemoveContainer(p.n.ctx(t, time.Minute), &runtimeapi.RemoveContainerRequest{ContainerId: p.ctrs[name]}); err != nil {
		t.Fatalf("RemoveContainer %s: %v", name, err)
	}
}

// logs returns the container's log lines (CRI log format stripped).
func (p *criPod) logs(name string) string {
	attempt := p.attempt[name]
	if attempt > 0 {
		attempt--
	}
	f, err := os.Open(filepath.Join(p.logDir, name, fmt.Sprintf("%d.log", attempt)))
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	var b strings.Builder
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		// "<time> <stream> <P|F> <line>"
		parts := strings.SplitN(sc.Text(), " ", 4)
		if len(parts) == 4 {
			b.WriteString(parts[3])
			if parts[2] == "F" {
				b.WriteByte('\n')
			}
		}
	}
	return b.String()
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

// probe runs an httpGet probe as kubelet does: GET scheme://host:port/path
// (host defaults to the pod IP, the node IP under hostNetwork), success for
// 200-399 within timeoutSeconds (default 1).
func (p *criPod) probe(pr *corev1.Probe, c corev1.Container) (int, string, error) {
	g := pr.HTTPGet
	host := g.Host
	if host == "" {
		host = p.nodeIP
	}
	port := g.Port.IntValue()
	if port == 0 {
		for _, cp := range c.Ports {
			if cp.Name == g.Port.String() {
				port = int(cp.ContainerPort)
			}
		}
	}
	scheme := strings.ToLower(string(g.Scheme))
	if scheme == "" {
		scheme = "http"
	}
	timeout := time.Duration(max(pr.TimeoutSeconds, 1)) * time.Second
	hc := &http.Client{Timeout: timeout}
	resp, err := hc.Get(fmt.Sprintf("%s://%s:%d%s", scheme, host, port, g.Path))
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 10<<10))
	return resp.StatusCode, string(body), nil
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
