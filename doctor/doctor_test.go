package doctor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

type fakeCtrd struct {
	version string
	err     error
	plugins []Plugin
}

func (f fakeCtrd) Version(context.Context) (string, error)   { return f.version, f.err }
func (f fakeCtrd) Plugins(context.Context) ([]Plugin, error) { return f.plugins, f.err }

func images(configPath string, discard bool) Plugin {
	d := "false"
	if discard {
		d = "true"
	}
	return Plugin{Type: "io.containerd.cri.v1", ID: "images", Exports: map[string]string{"RegistryConfigPath": configPath, "DiscardUnpackedLayers": d}}
}

const mirror = "http://127.0.0.1:30000"

// setup writes containerd's config and a hosts.toml for docker.io whose
// first host is first ("" for none).
func setup(t *testing.T, config, first string) *Input {
	t.Helper()
	dir := t.TempDir()
	hosts := filepath.Join(dir, "certs.d")
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte(strings.ReplaceAll(config, "HOSTS", hosts)), 0o600); err != nil {
		t.Fatal(err)
	}
	if first != "" {
		os.MkdirAll(filepath.Join(hosts, "docker.io"), 0o755)
		body := `server = "https://registry-1.docker.io"` + "\n\n[host.\"" + first + "\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
		if err := os.WriteFile(filepath.Join(hosts, "docker.io", "hosts.toml"), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return &Input{ConfigFile: cfg, HostsDir: hosts, Registries: []string{"docker.io"}, Mirror: mirror, PullThrough: true, Socket: "/run/c.sock"}
}

func want(t *testing.T, r Report, check string, st Status, sawHas, fixHas string) {
	t.Helper()
	x, ok := r.Get(check)
	if !ok {
		t.Fatalf("no %s result in %+v", check, r.Results)
	}
	if x.Status != st || !strings.Contains(x.Saw, sawHas) || !strings.Contains(x.Fix, fixHas) {
		t.Errorf("%s = %s %q fix %q; want %s, saw containing %q, fix containing %q", check, x.Status, x.Saw, x.Fix, st, sawHas, fixHas)
	}
}

const v16OK = `version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "HOSTS"
`

func TestContainerd16(t *testing.T) {
	ctx := context.Background()
	in := setup(t, v16OK, mirror)
	in.Containerd = fakeCtrd{version: "1.6.20~ds1"}
	r := Run(ctx, in, Local[:5]...)
	want(t, r, "containerd", OK, "1.6.20~ds1", "")
	want(t, r, "config_path", OK, "includes", "")
	want(t, r, "hosts.toml docker.io", OK, "lists "+mirror+" first", "")
	want(t, r, "transfer_service", OK, "do not use the transfer service", "")
	want(t, r, "discard_unpacked_layers", OK, "false", "")
	if r.Failed() {
		t.Errorf("a correct setup failed: %+v", r.Results)
	}

	// 1.x has no default config_path.
	in = setup(t, "version = 2\n", mirror)
	in.Containerd = fakeCtrd{version: "1.6.20"}
	r = Run(ctx, in, Local[:5]...)
	want(t, r, "config_path", Fail, "sets no registry config_path", `config_path = "`)
	if !r.Failed() {
		t.Error("a missing config_path did not fail the report")
	}

	// The registry before the mirror.
	in = setup(t, v16OK, "https://registry-1.docker.io")
	in.Containerd = fakeCtrd{version: "1.6.20"}
	r = Run(ctx, in, Local[:5]...)
	want(t, r, "hosts.toml docker.io", Fail, "lists https://registry-1.docker.io first, not this mirror", "peerd containerd-config")

	in = setup(t, v16OK+"[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  discard_unpacked_layers = true\n", mirror)
	in.Containerd = fakeCtrd{version: "1.6.20"}
	r = Run(ctx, in, Local[:5]...)
	want(t, r, "discard_unpacked_layers", Warn, "true", "discard_unpacked_layers = false")
	in.PullThrough = false
	in.cs = ctrdState{}
	r = Run(ctx, in, Local[:5]...)
	want(t, r, "discard_unpacked_layers", Fail, "peerd caches none", "discard_unpacked_layers = false")
}

func TestContainerd2(t *testing.T) {
	ctx := context.Background()
	in := setup(t, "version = 3\n", mirror)
	// 2.x's default config_path is a list: fine for local pulls, not for the transfer service.
	in.Containerd = fakeCtrd{version: "v2.1.1", plugins: []Plugin{images("/etc/containerd/certs.d:/etc/docker/certs.d", false)}}
	r := Run(ctx, in, Local[:5]...)
	want(t, r, "config_path", Fail, "does not include", "")
	want(t, r, "transfer_service", Fail, "as one folder", "use_local_image_pull = true")

	in = setup(t, "version = 3\n", mirror)
	in.Containerd = fakeCtrd{version: "v2.1.1", plugins: []Plugin{images(in.HostsDir, false)}}
	r = Run(ctx, in, Local[:5]...)
	want(t, r, "config_path", OK, "containerd's CRI image plugin", "")
	want(t, r, "transfer_service", OK, "reads hosts.toml from", "")
	if r.Failed() {
		t.Errorf("a correct 2.x setup failed: %+v", r.Results)
	}

	// A list with local pulls is fine.
	in = setup(t, "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\n  use_local_image_pull = true\n", mirror)
	in.Containerd = fakeCtrd{version: "v2.4.2", plugins: []Plugin{images(in.HostsDir+":/etc/docker/certs.d", false)}}
	r = Run(ctx, in, Local[:5]...)
	want(t, r, "config_path", OK, "includes", "")
	want(t, r, "transfer_service", OK, "use_local_image_pull = true", "")

	// discard_unpacked_layers makes containerd pull locally, and is itself a warning.
	in = setup(t, "version = 3\n", mirror)
	in.Containerd = fakeCtrd{version: "v2.4.2", plugins: []Plugin{images(in.HostsDir+":/x", true)}}
	r = Run(ctx, in, Local[:5]...)
	want(t, r, "transfer_service", OK, "discard_unpacked_layers", "")
	want(t, r, "discard_unpacked_layers", Warn, "containerd's CRI image plugin", `[plugins."io.containerd.cri.v1.images"]`)

	// 2.0 does not pull through the transfer service.
	in = setup(t, "version = 3\n", mirror)
	in.Containerd = fakeCtrd{version: "v2.0.5", plugins: []Plugin{images("/a:/b", false)}}
	r = Run(ctx, in, Local[:5]...)
	want(t, r, "transfer_service", OK, "do not use", "")
}

func TestContainerdDown(t *testing.T) {
	in := setup(t, v16OK, mirror)
	in.Containerd = fakeCtrd{err: errors.New("connection refused")}
	r := Run(context.Background(), in, Local[:5]...)
	want(t, r, "containerd", Fail, "connection refused", "--containerd-socket")
	in = setup(t, v16OK, mirror)
	r = Run(context.Background(), in, Local[:5]...)
	want(t, r, "containerd", OK, "off", "")
}

type fakeFS struct {
	exists map[string]error
	mounts map[string]string
	st     FSStat
	used   int64
	kernel string
}

func (f fakeFS) Exists(p string) error {
	if err, ok := f.exists[p]; ok {
		return err
	}
	return nil
}
func (f fakeFS) Statfs(string) (FSStat, error)                 { return f.st, nil }
func (f fakeFS) MountType(p string) (string, error)            { return f.mounts[p], nil }
func (f fakeFS) Usage(string) (int64, error)                   { return f.used, nil }
func (f fakeFS) KernelRelease() (string, error)                { return f.kernel, nil }
func (f fakePeers) DialBack(context.Context) (DialBack, error) { return f.db, f.err }

type fakeFUSE bool

func (f fakeFUSE) Passthrough() bool { return bool(f) }

func TestHost(t *testing.T) {
	ctx := context.Background()
	good := fakeFS{mounts: map[string]string{"/peerd/blobs": "fuse.peerd"}, st: FSStat{Type: "ext4", Avail: 100 << 30}, kernel: "6.12.1"}
	in := &Input{FS: good, Mount: "/peerd/blobs", Passthrough: true, CacheDir: "/var/lib/peerd/cache", CacheSize: 10 << 30, FUSE: fakeFUSE(true)}
	r := Run(ctx, in, CheckFUSE, CheckPassthrough, CheckCacheFS)
	want(t, r, "fuse", OK, "answering", "")
	want(t, r, "fuse_passthrough", OK, "on", "")
	want(t, r, "cache_fs", OK, "on ext4", "")

	bad := good
	bad.exists = map[string]error{"/dev/fuse": &fs.PathError{Op: "stat", Path: "/dev/fuse", Err: fs.ErrNotExist}}
	in.FS = bad
	want(t, Run(ctx, in, CheckFUSE), "fuse", Fail, "/dev/fuse: does not exist", "modprobe fuse")
	bad.exists = map[string]error{"/peerd/blobs/sha256": &fs.PathError{Op: "stat", Err: syscall.ENOTCONN}}
	in.FS = bad
	want(t, Run(ctx, in, CheckFUSE), "fuse", Fail, "dead", "umount -l")
	bad.exists, bad.mounts = nil, nil
	in.FS = bad
	want(t, Run(ctx, in, CheckFUSE), "fuse", Fail, "nothing is mounted", "")

	old := good
	old.kernel = "6.1.0-28-amd64"
	in.FS, in.FUSE = old, fakeFUSE(false)
	want(t, Run(ctx, in, CheckPassthrough), "fuse_passthrough", Warn, "kernel 6.1.0-28-amd64 has no FUSE passthrough", "6.9")

	full := good
	full.st = FSStat{Type: "xfs", Avail: 3 << 30}
	full.used = 1 << 30
	in.FS = full
	want(t, Run(ctx, in, CheckCacheFS), "cache_fs", Warn, "fill the disk", "lower --cache-size")
	full.st.Avail = 10 << 20
	in.FS = full
	want(t, Run(ctx, in, CheckCacheFS), "cache_fs", Fail, "10.0MiB free", "free space")
}

type fakePeers struct {
	size, conn, boot int
	db               DialBack
	err              error
}

func (f fakePeers) RoutingTableSize() int { return f.size }
func (f fakePeers) ConnectedPeers() int   { return f.conn }
func (f fakePeers) BootstrapPeers() int   { return f.boot }

func TestPeers(t *testing.T) {
	ctx := context.Background()
	in := &Input{P2PPort: "30001", PeerPort: "30002", Peers: fakePeers{size: 3, conn: 3, boot: 1, db: DialBack{Peer: "12D3KooWabcdefghijklmnop",
		Ports: []PortCheck{{Name: "p2p", Addr: "10.0.0.1:30001"}, {Name: "peer", Addr: "10.0.0.1:30002"}}, ClockOffset: 40 * time.Millisecond, RTT: time.Millisecond}}}
	r := Run(ctx, in, Daemon[1:]...)
	want(t, r, "p2p_routing", OK, "3 peer(s)", "")
	want(t, r, "p2p_reachable", OK, "reached p2p 10.0.0.1:30001, peer 10.0.0.1:30002", "")
	want(t, r, "clock", OK, "40ms", "")

	in.Peers = fakePeers{boot: 2}
	want(t, Run(ctx, in, CheckRouting), "p2p_routing", Fail, "bootstrap reached nobody", "30001")
	in.Peers = fakePeers{}
	want(t, Run(ctx, in, CheckRouting), "p2p_routing", Warn, "alone", "--bootstrap")
	in.Peers = fakePeers{err: ErrNoPeer}
	want(t, Run(ctx, in, CheckReachable), "p2p_reachable", Warn, "no connected peer", "")

	in.Peers = fakePeers{db: DialBack{Peer: "p", Ports: []PortCheck{{Name: "p2p", Addr: "10.0.0.1:30001", Err: "i/o timeout"}, {Name: "peer", Addr: "10.0.0.1:30002"}}, ClockOffset: -2 * time.Hour}}
	r = Run(ctx, in, CheckReachable)
	want(t, r, "p2p_reachable", Fail, "p2p 10.0.0.1:30001: i/o timeout", "inbound TCP port(s) 30001 ")
	want(t, r, "clock", Fail, "-2h0m0s", "synchronise")
	in.Peers = fakePeers{db: DialBack{Peer: "p", ClockOffset: 7 * time.Minute}}
	want(t, Run(ctx, in, CheckReachable), "clock", Warn, "7m0s", "synchronise")
}

func TestOutput(t *testing.T) {
	r := Report{Results: []Result{
		{Check: "containerd", Status: OK, Saw: "reachable, v2.1.1"},
		{Check: "hosts.toml docker.io", Status: Fail, Saw: "x\nlists y first", Fix: "run z"},
	}}
	var b bytes.Buffer
	r.WriteTable(&b)
	wantTable := "ok   containerd            reachable, v2.1.1\n" +
		"fail hosts.toml docker.io  x lists y first\n" +
		"                           fix: run z\n"
	if b.String() != wantTable {
		t.Errorf("table:\n%s\nwant:\n%s", b.String(), wantTable)
	}
	b.Reset()
	r.WriteJSON(&b)
	var back Report
	if err := json.Unmarshal(b.Bytes(), &back); err != nil || len(back.Results) != 2 || back.Results[1].Status != Fail || back.Results[1].Fix != "run z" {
		t.Errorf("json round trip: %v %+v", err, back)
	}
}
