package itest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

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
	waitMetric(t, nodes[0].Node, "peerd_p2p_provides_total", 3, "result=ok")

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
