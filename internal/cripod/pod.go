package cripod

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Client is a CRI client of one containerd.
type Client struct {
	conn *grpc.ClientConn
	RT   runtimeapi.RuntimeServiceClient
	Img  runtimeapi.ImageServiceClient
}

// Dial makes a client of the CRI socket at sock (connecting lazily).
func Dial(sock string) (*Client, error) {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, RT: runtimeapi.NewRuntimeServiceClient(conn), Img: runtimeapi.NewImageServiceClient(conn)}, nil
}

func (c *Client) Close() error { return c.conn.Close() }

// Ready reports nil once the CRI runtime answers and reports ready.
func (c *Client) Ready(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := c.RT.Status(ctx, &runtimeapi.StatusRequest{})
	if err != nil {
		return err
	}
	for _, cd := range st.GetStatus().GetConditions() {
		if cd.Type == runtimeapi.RuntimeReady && !cd.Status {
			return fmt.Errorf("CRI runtime not ready: %s", cd.Message)
		}
	}
	return nil
}

// RemoveAll stops and removes every pod sandbox, as a node's drain would.
func (c *Client) RemoveAll(ctx context.Context) {
	l, err := c.RT.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		return
	}
	for _, p := range l.Items {
		c.RT.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: p.Id})
		c.RT.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.Id})
	}
}

// Pod is one pod run through CRI the way kubelet runs it.
type Pod struct {
	c        *Client
	Spec     corev1.PodSpec
	Name     string
	Handler  string            // runtime handler ("" = default)
	NodeIP   string            // status.hostIP
	NodeName string            // spec.nodeName
	LogDir   string            // the pod's log folder
	ID       string            // sandbox id
	ctrs     map[string]string // container name -> id of its latest attempt
	attempt  map[string]uint32
}

// RunPod runs the pod's sandbox; its containers start with Start.
func (c *Client) RunPod(ctx context.Context, name string, spec corev1.PodSpec, nodeName, nodeIP, handler, logDir string) (*Pod, error) {
	p := &Pod{c: c, Spec: spec, Name: name, Handler: handler, NodeIP: nodeIP, NodeName: nodeName,
		LogDir: logDir, ctrs: map[string]string{}, attempt: map[string]uint32{}}
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, err
	}
	if !spec.HostNetwork {
		return nil, fmt.Errorf("pod %s: only host-network pods run here: others need CNI", name)
	}
	resp, err := c.RT.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: p.sandboxConfig(), RuntimeHandler: handler})
	if err != nil {
		return nil, fmt.Errorf("RunPodSandbox %s: %w", name, err)
	}
	p.ID = resp.PodSandboxId
	return p, nil
}

func (p *Pod) privileged() bool {
	for _, c := range append(append([]corev1.Container{}, p.Spec.InitContainers...), p.Spec.Containers...) {
		if c.SecurityContext != nil && c.SecurityContext.Privileged != nil && *c.SecurityContext.Privileged {
			return true
		}
	}
	return false
}

func (p *Pod) namespaces() *runtimeapi.NamespaceOption {
	// hostNetwork: the node's network namespace; pid and ipc of the pod's own.
	return &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE, Pid: runtimeapi.NamespaceMode_CONTAINER, Ipc: runtimeapi.NamespaceMode_POD}
}

func (p *Pod) sandboxConfig() *runtimeapi.PodSandboxConfig {
	return &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: p.Name, Uid: p.Name + "-uid", Namespace: "peerd"},
		LogDirectory: p.LogDir,
		Labels:       map[string]string{"io.kubernetes.pod.name": p.Name, "io.kubernetes.pod.namespace": "peerd"},
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
func (p *Pod) env(c corev1.Container) ([]*runtimeapi.KeyValue, error) {
	var out []*runtimeapi.KeyValue
	for _, e := range c.Env {
		v := e.Value
		switch {
		case e.ValueFrom == nil:
		case e.ValueFrom.FieldRef != nil:
			switch e.ValueFrom.FieldRef.FieldPath {
			case "spec.nodeName":
				v = p.NodeName
			case "status.hostIP", "status.podIP":
				v = p.NodeIP
			case "metadata.namespace":
				v = "peerd"
			case "metadata.name":
				v = p.Name
			default:
				return nil, fmt.Errorf("env %s: fieldRef %s not handled here", e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
		case e.ValueFrom.ResourceFieldRef != nil:
			r := e.ValueFrom.ResourceFieldRef
			q, ok := c.Resources.Limits[corev1.ResourceName(strings.TrimPrefix(r.Resource, "limits."))]
			if !strings.HasPrefix(r.Resource, "limits.") || !ok {
				return nil, fmt.Errorf("env %s: resourceFieldRef %s not handled here", e.Name, r.Resource)
			}
			div := r.Divisor.Value()
			if div == 0 {
				div = 1
			}
			v = fmt.Sprint((q.Value() + div - 1) / div)
		default:
			return nil, fmt.Errorf("env %s: source not handled here", e.Name)
		}
		out = append(out, &runtimeapi.KeyValue{Key: e.Name, Value: []byte(v)})
	}
	return out, nil
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

// HostPath applies kubelet's hostPath type check (and DirectoryOrCreate's
// create) and returns the path, or the error kubelet would report.
func HostPath(v *corev1.HostPathVolumeSource) (string, error) {
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
func (p *Pod) mounts(c corev1.Container) ([]*runtimeapi.Mount, error) {
	vols := map[string]corev1.Volume{}
	for _, v := range p.Spec.Volumes {
		vols[v.Name] = v
	}
	var out []*runtimeapi.Mount
	for _, m := range c.VolumeMounts {
		v, ok := vols[m.Name]
		if !ok {
			return nil, fmt.Errorf("container %s mounts volume %s, which the pod does not have", c.Name, m.Name)
		}
		if v.HostPath == nil {
			return nil, fmt.Errorf("volume %s is not a hostPath: not handled here", m.Name)
		}
		src, err := HostPath(v.HostPath)
		if err != nil {
			return nil, fmt.Errorf("kubelet would not start container %s: volume %s: %w", c.Name, m.Name, err)
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
	return out, nil
}

// ContainerConfig is the CRI config kubelet would make for c, as the next
// attempt of that container.
func (p *Pod) ContainerConfig(c corev1.Container) (*runtimeapi.ContainerConfig, error) {
	env, err := p.env(c)
	if err != nil {
		return nil, err
	}
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
	mounts, err := p.mounts(c)
	if err != nil {
		return nil, err
	}
	p.attempt[c.Name]++
	attempt := p.attempt[c.Name] - 1
	return &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: c.Name, Attempt: attempt},
		Image:    &runtimeapi.ImageSpec{Image: c.Image},
		Command:  cmd,
		Args:     args,
		Envs:     env,
		Mounts:   mounts,
		LogPath:  fmt.Sprintf("%s/%d.log", c.Name, attempt),
		Labels:   map[string]string{"io.kubernetes.container.name": c.Name},
		Linux:    &runtimeapi.LinuxContainerConfig{Resources: res, SecurityContext: sc},
	}, nil
}

// Start creates and starts container c as its next attempt, pulling
// nothing: the image must be in containerd (imagePullPolicy IfNotPresent
// with the image present).
func (p *Pod) Start(ctx context.Context, c corev1.Container) (string, error) {
	st, err := p.c.Img.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: c.Image}})
	if err != nil || st.Image == nil {
		return "", fmt.Errorf("image %s is not in containerd (%v): it is never pulled here", c.Image, err)
	}
	cfg, err := p.ContainerConfig(c)
	if err != nil {
		return "", err
	}
	cr, err := p.c.RT.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: p.ID, Config: cfg, SandboxConfig: p.sandboxConfig()})
	if err != nil {
		return "", fmt.Errorf("CreateContainer %s: %w", c.Name, err)
	}
	p.ctrs[c.Name] = cr.ContainerId
	if _, err := p.c.RT.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: cr.ContainerId}); err != nil {
		return "", fmt.Errorf("StartContainer %s: %w\n%s", c.Name, err, p.Logs(c.Name))
	}
	return cr.ContainerId, nil
}

// Status is the status of the latest attempt of container name.
func (p *Pod) Status(ctx context.Context, name string) (*runtimeapi.ContainerStatus, error) {
	st, err := p.c.RT.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: p.ctrs[name]})
	if err != nil {
		return nil, fmt.Errorf("ContainerStatus %s: %w", name, err)
	}
	return st.Status, nil
}

// RunInit runs an init container to completion within ctx; kubelet starts
// the main containers only after it exits 0.
func (p *Pod) RunInit(ctx context.Context, c corev1.Container) error {
	if _, err := p.Start(ctx, c); err != nil {
		return err
	}
	for {
		st, err := p.Status(ctx, c.Name)
		if err != nil {
			return err
		}
		if st.State == runtimeapi.ContainerState_CONTAINER_EXITED {
			if st.ExitCode != 0 {
				return fmt.Errorf("init container %s exited %d (%s %s)\n%s", c.Name, st.ExitCode, st.Reason, st.Message, p.Logs(c.Name))
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("init container %s did not exit: %w\n%s", c.Name, ctx.Err(), p.Logs(c.Name))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Grace is the pod's termination grace period (kubelet's default 30 s).
func (p *Pod) Grace() time.Duration {
	if g := p.Spec.TerminationGracePeriodSeconds; g != nil {
		return time.Duration(*g) * time.Second
	}
	return 30 * time.Second
}

// Stop stops container name, giving it grace to exit after SIGTERM before
// SIGKILL (0: SIGKILL at once), and returns its status.
func (p *Pod) Stop(ctx context.Context, name string, grace time.Duration) (*runtimeapi.ContainerStatus, error) {
	if _, err := p.c.RT.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: p.ctrs[name], Timeout: int64(grace / time.Second)}); err != nil {
		return nil, fmt.Errorf("StopContainer %s: %w", name, err)
	}
	return p.Status(ctx, name)
}

// Remove removes the latest attempt of container name.
func (p *Pod) Remove(ctx context.Context, name string) error {
	if _, err := p.c.RT.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: p.ctrs[name]}); err != nil {
		return fmt.Errorf("RemoveContainer %s: %w", name, err)
	}
	return nil
}

// Probe runs an httpGet probe as kubelet does: GET scheme://host:port/path
// (host defaults to the pod IP, the node IP under hostNetwork), success for
// 200-399 within timeoutSeconds (default 1).
func (p *Pod) Probe(pr *corev1.Probe, c corev1.Container) (int, string, error) {
	g := pr.HTTPGet
	if g == nil {
		return 0, "", fmt.Errorf("container %s: only httpGet probes are run here", c.Name)
	}
	host := g.Host
	if host == "" {
		host = p.NodeIP
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
