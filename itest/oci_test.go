package itest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/peerd-project/peerd/artifact/artifacttest"
	"github.com/peerd-project/peerd/internal/testenv"
)

// TestFUSEArtifactByReference: an artifact pushed ORAS-style (files as
// titled layers) to Debian's docker-registry is read through three real
// peerd mounts as <mount>/oci/<registry>/models/<name>:<tag>/<title>. The
// first node's read comes from the registry; a second node then reads it
// from the first; and a second artifact read by all three at once costs
// the registry about one copy.
func TestFUSEArtifactByReference(t *testing.T) {
	fuseNeedDevice(t)
	reg := startCtrdRegistry(t, testenv.LookPath(t, "docker-registry", "docker-registry"))
	const size = 12<<20 + 321
	model := artifacttest.Random(size)
	cfg := []byte(`{"architectures":["demo"]}`)
	artifacttest.Push(t, reg.direct, "models/demo:v1", artifacttest.Artifact(t,
		artifacttest.File{Title: "model.safetensors", Data: model}, artifacttest.File{Title: "config.json", Data: cfg}))

	var nodes []*p2pNode
	var mounts []string
	for i := 0; i < 3; i++ {
		mp := fuseMountDir(t)
		args := patient("--registries", "http://"+reg.Host, "--mount", mp, "--chunk-size", "1MiB")
		if i > 0 {
			args = append(args, "--bootstrap", nodes[0].P2PAddr)
		}
		nodes = append(nodes, startP2PNode(t, args...))
		mounts = append(mounts, mp)
	}
	for i, n := range nodes {
		waitReady(t, n.Node)
		waitMetric(t, n.Node, "peerd_p2p_connected_peers", 2)
		fuseWaitMounted(t, mounts[i])
	}
	file := func(i int, ref, name string) string {
		return filepath.Join(mounts[i], "oci", reg.Host, "models", ref, name)
	}
	ents, err := os.ReadDir(filepath.Join(mounts[0], "oci"))
	if err != nil || len(ents) != 1 || ents[0].Name() != reg.Host {
		t.Fatalf("ls oci: %v, %v; want the one registry %s", ents, err, reg.Host)
	}

	// The first node reads the model from the registry.
	before := reg.blobBytes.Load()
	if b, err := os.ReadFile(file(0, "demo:v1", "model.safetensors")); err != nil || !bytes.Equal(b, model) {
		nodes[0].DumpLog(40)
		t.Fatalf("node 1: model.safetensors: %d bytes, %v", len(b), err)
	}
	if b, err := os.ReadFile(file(0, "demo:v1", "config.json")); err != nil || !bytes.Equal(b, cfg) {
		t.Fatalf("node 1: config.json: %q, %v", b, err)
	}
	first := reg.blobBytes.Load() - before
	waitMetric(t, nodes[0].Node, "peerd_cache_verifications_total", 2, "result=ok")
	waitMetric(t, nodes[0].Node, "peerd_p2p_provides_total", 2, "result=ok") // the two files read; the manifest came with the tag

	// The second reads it from the first: the registry sends next to nothing.
	before = reg.blobBytes.Load()
	fuseCheckRandomReads(t, file(1, "demo:v1", "model.safetensors"), model)
	if b, err := os.ReadFile(file(1, "demo:v1", "model.safetensors")); err != nil || !bytes.Equal(b, model) {
		t.Fatalf("node 2: %d bytes, %v", len(b), err)
	}
	second := reg.blobBytes.Load() - before
	received := nodes[1].Metric(t, "peerd_p2p_received_bytes_total")
	t.Logf("registry blob bytes: node 1 alone %d (%.2f× the model), node 2 after it %d; node 2 received %.0f bytes from peers",
		first, float64(first)/size, second, received)
	if first < size {
		t.Fatalf("the registry sent node 1 %d bytes of a %d-byte model", first, size)
	}
	if second > size/20 || received < size {
		t.Fatalf("node 2 took %d bytes from the registry and %.0f from peers; want the model from its peer", second, received)
	}

	// A second artifact, all three at once: a swarm, about one copy from the registry.
	big := artifacttest.Random(24<<20 + 5)
	artifacttest.Push(t, reg.direct, "models/burst:v1", artifacttest.Artifact(t, artifacttest.File{Title: "weights.bin", Data: big}))
	before = reg.blobBytes.Load()
	var wg sync.WaitGroup
	errs := make([]error, len(nodes))
	for i := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, err := os.ReadFile(file(i, "burst:v1", "weights.bin"))
			if err == nil && !bytes.Equal(b, big) {
				err = fmt.Errorf("%d bytes differ from what was pushed", len(b))
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("node %d: weights.bin: %v", i+1, err)
		}
	}
	burst := reg.blobBytes.Load() - before
	t.Logf("3 nodes reading a %d-byte file at once: the registry sent %.2f× it", len(big), float64(burst)/float64(len(big)))
	if float64(burst) > 1.25*float64(len(big)) {
		t.Fatalf("the registry sent %d bytes (%.2f×) for a file 3 nodes read at once; want ≤ 1.25×", burst, float64(burst)/float64(len(big)))
	}
}

// TestWarm: `peerd warm <reference>` on one node fetches an artifact into its
// cache from the registry, on a second node from the first; the progress
// shows on a terminal (captured through script(1)) and as plain lines; bad
// references fail with the daemon's reason and exit status 1.
func TestWarm(t *testing.T) {
	reg := startCtrdRegistry(t, testenv.LookPath(t, "docker-registry", "docker-registry"))
	const size = 20<<20 + 7
	model := artifacttest.Random(size)
	artifacttest.Push(t, reg.direct, "models/warm:v1", artifacttest.Artifact(t,
		artifacttest.File{Title: "model.safetensors", Data: model}, artifacttest.File{Title: "tokenizer.json", Data: []byte(`{}`)}))
	ref := reg.Host + "/models/warm:v1"
	a := startP2PNode(t, patient("--registries", "http://"+reg.Host, "--warm-rate", "0")...)
	b := startP2PNode(t, patient("--registries", "http://"+reg.Host, "--warm-rate", "0", "--bootstrap", a.P2PAddr)...)
	for _, n := range []*p2pNode{a, b} {
		waitReady(t, n.Node)
		waitMetric(t, n.Node, "peerd_p2p_connected_peers", 1)
	}
	warm := func(n *p2pNode, args ...string) (string, error) {
		out, err := exec.Command(peerdBin, append([]string{"warm", "--http-addr", n.HTTPAddr}, args...)...).CombinedOutput()
		return string(out), err
	}

	before := reg.blobBytes.Load()
	out, err := warm(a, "--plain", ref)
	if err != nil {
		t.Fatalf("peerd warm on node 1: %v\n%s", err, out)
	}
	t.Logf("node 1, plain:\n%s", out)
	if !strings.Contains(out, "model.safetensors") || !strings.Contains(out, "warmed "+ref+": 4 files") {
		t.Fatalf("plain output lacks a file line or the summary:\n%s", out)
	}
	first := reg.blobBytes.Load() - before
	waitMetric(t, a.Node, "peerd_p2p_provides_total", 4, "result=ok")
	if first < size || first > size+size/20 {
		t.Fatalf("node 1's warm took %d bytes from the registry for a %d-byte model", first, size)
	}

	// Node 2 on a terminal: the progress bar, then the summary; from node 1.
	before = reg.blobBytes.Load()
	script, err := exec.LookPath("script")
	if err != nil {
		t.Fatalf("script(1) (bsdutils) is needed to capture a terminal: %v", err)
	}
	cmd := exec.Command(script, "-qefc", fmt.Sprintf("%s warm --http-addr %s %s", peerdBin, b.HTTPAddr, ref), "/dev/null")
	raw, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("peerd warm on node 2 (terminal): %v\n%q", err, raw)
	}
	t.Logf("node 2, terminal (%d bytes written; the last screen):\n%s", len(raw), lastScreen(string(raw)))
	if out := os.Getenv("PEERD_WARM_CAPTURE"); out != "" {
		os.WriteFile(out, raw, 0o644) // the raw terminal output, to look at
	}
	if !strings.Contains(string(raw), "] ") || !strings.Contains(string(raw), "%") || !strings.Contains(string(raw), "\033[K") {
		t.Fatalf("no progress bar drawn on the terminal:\n%q", raw)
	}
	if !strings.Contains(lastScreen(string(raw)), "warmed "+ref) || !strings.Contains(lastScreen(string(raw)), "peers 20.0 MiB") {
		t.Fatalf("terminal's last screen lacks the summary with the peers' bytes:\n%s", lastScreen(string(raw)))
	}
	if second := reg.blobBytes.Load() - before; second > size/20 {
		t.Fatalf("node 2's warm took %d bytes from the registry while node 1 held the model", second)
	}
	if got := b.Metric(t, "peerd_p2p_received_bytes_total"); got < size {
		t.Fatalf("node 2 received %v bytes from peers, want the model's %d", got, size)
	}

	// Refusals: the daemon's reason, exit status 1.
	for args, want := range map[string]string{
		reg.Host + "/models/nope:v1":   "404",
		"10.9.9.9:5000/models/warm:v1": "not in --registries",
		reg.Host + "/models/warm":      "name a tag",
		reg.Host + "/Models/warm:v1":   "not a repository name",
	} {
		out, err := warm(a, "--plain", args)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(out, want) {
			t.Errorf("peerd warm %s: %v, output %q; want exit status 1 and %q", args, err, out, want)
		}
	}
	// --warm: a node that starts with the list warms it once it is ready.
	before = reg.blobBytes.Load()
	c := startP2PNode(t, patient("--registries", "http://"+reg.Host, "--warm", ref, "--bootstrap", a.P2PAddr)...)
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(c.Log(), "msg=warmed") {
		if time.Now().After(deadline) {
			c.DumpLog(40)
			t.Fatal("a node started with --warm did not warm its reference within 60s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got, took := c.Metric(t, "peerd_p2p_received_bytes_total"), reg.blobBytes.Load()-before; got < size || took > size/20 {
		t.Fatalf("--warm: %v bytes from peers, %d from the registry; want the model from its peers", got, took)
	}

	// A node without --registries says why.
	plainNode := StartNode(t, NodeOpts{})
	raw, err = exec.Command(peerdBin, "warm", "--http-addr", plainNode.HTTPAddr, ref).CombinedOutput()
	if err == nil || !strings.Contains(string(raw), "no --registries") {
		t.Errorf("peerd warm on a node without --registries: %v, %s", err, raw)
	}

	// Only peerd warm's request is taken: a page's cross-site POST lacks the header.
	code, _, body := Get(t, "POST", a.URL("/api/warm?ref="+ref), nil)
	if code != 403 {
		t.Errorf("POST without the warm header: %d %s", code, body)
	}
	if code, _, _ := Get(t, "GET", a.URL("/api/warm?ref="+ref), map[string]string{"X-Peerd-Warm": "1"}); code != 405 {
		t.Errorf("GET: %d, want 405", code)
	}
}

// lastScreen is what a terminal shows at the end of raw output: each line
// after its last carriage return, escape sequences left out.
func lastScreen(raw string) string {
	var out []string
	for _, line := range strings.Split(strings.ReplaceAll(raw, "\r\n", "\n"), "\n") {
		if i := strings.LastIndex(line, "\r"); i >= 0 {
			line = line[i+1:]
		}
		line = strings.ReplaceAll(line, "\033[K", "")
		if line != "" {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// TestFUSEArtifactWithRegistryCredentials: a registry that wants a Bearer
// token from its token service (Basic credentials) serves a real peerd's
// mount with --registry-auth-file; without the file the folder is EACCES;
// the password shows nowhere in peerd's log.
func TestFUSEArtifactWithRegistryCredentials(t *testing.T) {
	fuseNeedDevice(t)
	reg := artifacttest.NewRegistry(t)
	data := artifacttest.Random(3<<20 + 9)
	artifacttest.Push(t, reg.Host, "private/m:v1", artifacttest.Artifact(t, artifacttest.File{Title: "weights.bin", Data: data}))
	const secret = "p4ss-not-for-logs"
	reg.SetAuth(&artifacttest.Auth{Prefix: "private/", User: "alice", Pass: secret})
	cfg := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(cfg, []byte(`{"auths":{"`+reg.Host+`":{"username":"alice","password":"`+secret+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	mpWith, mpWithout := fuseMountDir(t), fuseMountDir(t)
	with := StartNode(t, NodeOpts{Args: []string{"--registries", "http://" + reg.Host, "--mount", mpWith, "--registry-auth-file", cfg}})
	without := StartNode(t, NodeOpts{Args: []string{"--registries", "http://" + reg.Host, "--mount", mpWithout}})
	fuseWaitMounted(t, mpWith)
	fuseWaitMounted(t, mpWithout)
	path := func(mp string) string { return filepath.Join(mp, "oci", reg.Host, "private", "m:v1", "weights.bin") }
	if b, err := os.ReadFile(path(mpWith)); err != nil || !bytes.Equal(b, data) {
		with.DumpLog(30)
		t.Fatalf("with credentials: %d bytes, %v", len(b), err)
	}
	if _, err := os.ReadDir(filepath.Dir(path(mpWithout))); !errors.Is(err, syscall.EACCES) {
		t.Fatalf("without credentials: %v, want EACCES", err)
	}
	if reg.TokenRequests.Load() == 0 {
		t.Fatal("the registry's token service was never asked")
	}
	for _, n := range []*Node{with, without} {
		if strings.Contains(n.Log(), secret) || strings.Contains(n.Log(), "tok-1") {
			t.Fatalf("%s's log shows a credential", n.Name)
		}
	}
	// A file that is not a registry config stops the daemon at start, with the reason.
	bad := filepath.Join(t.TempDir(), "bad.json")
	os.WriteFile(bad, []byte("not json"), 0o600)
	out, err := exec.Command(peerdBin, "run", "--data-dir", t.TempDir(), "--http-addr", "127.0.0.1:1", "--registry-auth-file", bad).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--registry-auth-file") {
		t.Fatalf("a bad --registry-auth-file: %v\n%s", err, out)
	}
}
