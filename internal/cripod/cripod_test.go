package cripod

import (
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func TestConfigRender(t *testing.T) {
	dir := t.TempDir()
	good := Config{Dir: dir, Socket: filepath.Join(dir, "c.sock"), HostsDir: filepath.Join(dir, "hosts"), Runc: "/usr/sbin/runc",
		SandboxImage: "peerd.invalid/pause:test", Snapshotter: "overlayfs"}
	s, err := good.Render()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`sandbox = "peerd.invalid/pause:test"`, `config_path = "` + good.HostsDir + `"`, `snapshotter = "overlayfs"`, "restrict_oom_score_adj = true"} {
		if !strings.Contains(s, want) {
			t.Errorf("config lacks %s:\n%s", want, s)
		}
	}
	if strings.Contains(s, "privileged_without_host_devices") {
		t.Error("a runtime handler without devices is rendered though NoDevHandler is empty")
	}
	bad := good
	bad.Dir, bad.Socket = "rel", "/"+strings.Repeat("s", 120)
	if _, err := bad.Render(); err == nil || !strings.Contains(err.Error(), `Dir "rel"`) || !strings.Contains(err.Error(), "at most 108") {
		t.Fatalf("bad config: %v, want both problems named", err)
	}
}

func TestContainerConfig(t *testing.T) {
	dir := t.TempDir()
	bidi, dirOrCreate := corev1.MountPropagationBidirectional, corev1.HostPathDirectoryOrCreate
	priv := true
	spec := corev1.PodSpec{
		HostNetwork: true,
		Volumes:     []corev1.Volume{{Name: "mnt", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: filepath.Join(dir, "mnt"), Type: &dirOrCreate}}}},
	}
	c := corev1.Container{
		Name: "peerd", Image: "example.invalid/peerd:1",
		Args: []string{"--p2p-addr=/ip4/$(NODE_IP)/tcp/1", "$(UNSET)"},
		Env: []corev1.EnvVar{
			{Name: "NODE_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.hostIP"}}},
			{Name: "MEM", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.memory", Divisor: resource.MustParse("1Mi")}}},
		},
		Resources:       corev1.ResourceRequirements{Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1Gi")}},
		SecurityContext: &corev1.SecurityContext{Privileged: &priv},
		VolumeMounts:    []corev1.VolumeMount{{Name: "mnt", MountPath: "/mnt", MountPropagation: &bidi}},
	}
	p := &Pod{Spec: spec, Name: "p", NodeIP: "10.0.0.7", ctrs: map[string]string{}, attempt: map[string]uint32{}}
	cfg, err := p.ContainerConfig(c)
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Args; got[0] != "--p2p-addr=/ip4/10.0.0.7/tcp/1" || got[1] != "$(UNSET)" {
		t.Errorf("args %q: want $(NODE_IP) expanded and an unknown reference kept", got)
	}
	if string(cfg.Envs[1].Value) != "1024" {
		t.Errorf("MEM = %s, want 1024 (1Gi in Mi)", cfg.Envs[1].Value)
	}
	m := cfg.Mounts[0]
	if m.Propagation != runtimeapi.MountPropagation_PROPAGATION_BIDIRECTIONAL || m.HostPath != filepath.Join(dir, "mnt") {
		t.Errorf("mount %v, want the hostPath, bidirectional", m)
	}
	if !cfg.Linux.SecurityContext.Privileged || cfg.Linux.Resources.MemoryLimitInBytes != 1<<30 {
		t.Errorf("security context %v, resources %v", cfg.Linux.SecurityContext, cfg.Linux.Resources)
	}
	if next, _ := p.ContainerConfig(c); next.Metadata.Attempt != 1 || next.LogPath != "peerd/1.log" {
		t.Errorf("second config: attempt %d, log %s, want 1 and peerd/1.log", next.Metadata.Attempt, next.LogPath)
	}

	// A hostPath whose type check fails stops the container, as in kubelet.
	sock := corev1.HostPathSocket
	p.Spec.Volumes[0].HostPath = &corev1.HostPathVolumeSource{Path: filepath.Join(dir, "nosuch.sock"), Type: &sock}
	if _, err := p.ContainerConfig(c); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("missing socket: %v, want the type check's error", err)
	}
	// A field reference kubelet fills but this translation does not is an error, not an empty value.
	c.Env = append(c.Env, corev1.EnvVar{Name: "X", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.uid"}}})
	if _, err := p.ContainerConfig(c); err == nil || !strings.Contains(err.Error(), "metadata.uid") {
		t.Fatalf("unhandled fieldRef: %v", err)
	}
}
