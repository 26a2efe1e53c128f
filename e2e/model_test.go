package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/reliability"
)

// model is an OCI artifact pushed the way ORAS pushes files: a
// model.safetensors (a valid safetensors header, then random tensors), a
// config.json and a tokenizer.json, each a layer named by its title.
type model struct {
	ref       string // <registry>/<repository>:<tag>, as the mount's oci folder names it
	digest    string // model.safetensors's
	size      int64  // model.safetensors's
	headerLen int64  // 8 + the header's JSON
}

const modelTensors = 64

// generateModel writes the artifact's blobs and manifest under dir.
func generateModel(dir string, size int64, seed uint64) (model, string, error) {
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return model{}, "", err
	}
	per := size / modelTensors
	header := map[string]any{"__metadata__": map[string]string{"format": "pt", "seed": fmt.Sprint(seed)}}
	for i := range modelTensors {
		header[fmt.Sprintf("layers.%02d.weight", i)] = map[string]any{
			"dtype": "U8", "shape": []int64{per}, "data_offsets": []int64{int64(i) * per, int64(i+1) * per}}
	}
	hj, err := json.Marshal(header)
	if err != nil {
		return model{}, "", err
	}
	var m model
	md, err := writeBlob(blobs, func(w io.Writer) error {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(hj)))
		if _, err := w.Write(n[:]); err != nil {
			return err
		}
		if _, err := w.Write(hj); err != nil {
			return err
		}
		_, err := io.CopyN(w, randReader(seed*7919), per*modelTensors)
		return err
	})
	if err != nil {
		return model{}, "", err
	}
	m.digest, m.size, m.headerLen = md.Digest, md.Size, 8+int64(len(hj))
	file := func(title string, d descriptor) map[string]any {
		return map[string]any{"mediaType": "application/octet-stream", "digest": d.Digest, "size": d.Size,
			"annotations": map[string]string{"org.opencontainers.image.title": title}}
	}
	small := func(s string) (descriptor, error) {
		return writeBlob(blobs, func(w io.Writer) error { _, err := io.WriteString(w, s); return err })
	}
	cfg, err := small(fmt.Sprintf(`{"architectures":["E2EModel"],"seed":%d}`, seed))
	if err != nil {
		return model{}, "", err
	}
	tok, err := small(`{"version":"1.0","model":{"vocab":{"a":0,"b":1}}}`)
	if err != nil {
		return model{}, "", err
	}
	empty, err := small("{}")
	if err != nil {
		return model{}, "", err
	}
	empty.MediaType = "application/vnd.oci.empty.v1+json"
	man, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"artifactType":  "application/vnd.peerd.e2e.model.v1",
		"config":        empty,
		"layers":        []any{file("model.safetensors", md), file("config.json", cfg), file("tokenizer.json", tok)},
	})
	if err != nil {
		return model{}, "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "manifest.json"), man, 0o644); err != nil {
		return model{}, "", err
	}
	sum := sha256.Sum256(man)
	return m, "sha256:" + hex.EncodeToString(sum[:]), nil
}

// pushModel generates a model and pushes it to the registry as e2e/<name>:v1.
func (c *cluster) pushModel(ctx context.Context, name string, seed uint64) model {
	c.t.Helper()
	dir := filepath.Join(c.dir, "models", name)
	m, digest, err := generateModel(dir, c.cfg.ImageSize, seed)
	if err != nil {
		c.t.Fatal(err)
	}
	repo := "e2e/" + name
	c.pushDir(ctx, dir, repo, digest)
	m.ref = registryID + "/" + repo + ":v1"
	return m
}

// modelRead is how one reader did.
type modelRead struct {
	header time.Duration // until the header was read (8 bytes + JSON)
	total  time.Duration
}

// readModel reads a model.safetensors the way a model server loads it:
// the header first, then every tensor in its own (shuffled) order; every
// byte must hash to the file's digest.
func readModel(path string, m model, seed uint64) (modelRead, error) {
	start := time.Now()
	f, err := os.Open(path)
	if err != nil {
		return modelRead{}, err
	}
	defer f.Close()
	var n [8]byte
	if _, err := f.ReadAt(n[:], 0); err != nil {
		return modelRead{}, fmt.Errorf("header length: %w", err)
	}
	hl := int64(binary.LittleEndian.Uint64(n[:]))
	if hl <= 0 || 8+hl > m.size {
		return modelRead{}, fmt.Errorf("header length %d of a %d-byte file", hl, m.size)
	}
	hj := make([]byte, hl)
	if _, err := f.ReadAt(hj, 8); err != nil {
		return modelRead{}, fmt.Errorf("header: %w", err)
	}
	r := modelRead{header: time.Since(start)}
	var header map[string]json.RawMessage
	if err := json.Unmarshal(hj, &header); err != nil {
		return r, fmt.Errorf("header JSON: %w", err)
	}
	type tensor struct{ begin, end int64 }
	var ts []tensor
	for name, raw := range header {
		if name == "__metadata__" {
			continue
		}
		var t struct {
			Offsets []int64 `json:"data_offsets"`
		}
		if err := json.Unmarshal(raw, &t); err != nil || len(t.Offsets) != 2 {
			return r, fmt.Errorf("tensor %s: %v", name, err)
		}
		ts = append(ts, tensor{8 + hl + t.Offsets[0], 8 + hl + t.Offsets[1]})
	}
	sort.Slice(ts, func(i, j int) bool { return ts[i].begin < ts[j].begin })
	rand.New(rand.NewPCG(seed, seed^0x5eed)).Shuffle(len(ts), func(i, j int) { ts[i], ts[j] = ts[j], ts[i] })
	all := make([]byte, m.size)
	copy(all, n[:])
	copy(all[8:], hj)
	for _, t := range ts {
		if _, err := f.ReadAt(all[t.begin:t.end], t.begin); err != nil {
			return r, fmt.Errorf("tensor at %d: %w", t.begin, err)
		}
	}
	r.total = time.Since(start)
	if sum := sha256.Sum256(all); "sha256:"+hex.EncodeToString(sum[:]) != m.digest {
		return r, fmt.Errorf("the %d bytes read hash to sha256:%x, want %s", len(all), sum, m.digest)
	}
	return r, nil
}

// Scenario 7: a model as an OCI artifact, read through the mount by
// reference (<mount>/oci/<registry>/e2e/<name>:v1/model.safetensors). One
// node alone first (its header time beside the registry's own first byte of
// the same blob), then all nodes at once on another model: every byte
// matches, and the registry sends about one copy.
func (c *cluster) modelBurst(t *testing.T) {
	c.need(t, "p2p", "fuse")
	ctx := context.Background()
	path := func(n *node, m model) string {
		reg, rest, _ := strings.Cut(m.ref, "/")
		repo, tag, _ := strings.Cut(rest, ":")
		return filepath.Join(n.mount, "oci", reg, filepath.Dir(repo), filepath.Base(repo)+":"+tag, "model.safetensors")
	}
	// The registry's own first byte: the header range, straight from it.
	lone := c.pushModel(ctx, "model-lone", 71)
	direct, err := c.firstBytes(ctx, c.nodes[0], "http://"+registryID+"/v2/e2e/model-lone/blobs/"+lone.digest, lone.headerLen)
	if err != nil {
		t.Fatal(err)
	}
	e0 := c.egress()
	alone, err := readModel(path(c.nodes[0], lone), lone, 1)
	if err != nil {
		t.Fatalf("node 1 alone: %v", err)
	}
	loneEgress := c.egress() - e0

	burst := c.pushModel(ctx, "model-burst", 72)
	e0, s0 := c.egress(), c.peerServed()
	reads := make([]modelRead, len(c.nodes))
	errs := make([]error, len(c.nodes))
	var wg sync.WaitGroup
	for i, n := range c.nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			reads[i], errs[i] = readModel(path(n, burst), burst, uint64(i+2))
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("%s: %v", c.nodes[i].name(), err)
		}
	}
	egress := c.egress() - e0
	var ds, hs []time.Duration
	for _, r := range reads {
		ds, hs = append(ds, r.total), append(hs, r.header)
	}
	p50, mx := stats(ds)
	h50, _ := stats(hs)
	c.report(row{scenario: "7-model-burst", nodes: len(c.nodes), size: burst.size, first: alone.total, p50: p50, max: mx,
		egress: egress, peerServed: c.peerServed() - s0,
		note: fmt.Sprintf("model.safetensors by reference through the mount, header then %d tensors shuffled; slowest %.2f× one node alone (egress %.2f×); cold header %v vs the registry's own %v (+%v); burst headers p50 %v",
			modelTensors, mx.Seconds()/alone.total.Seconds(), float64(loneEgress)/float64(lone.size),
			alone.header.Round(time.Millisecond), direct.Round(time.Millisecond), (alone.header - direct).Round(time.Millisecond), h50.Round(time.Millisecond))})
	reliability.Record(t, reliability.Row{Area: "models",
		Case:    fmt.Sprintf("%d nodes read a model (OCI artifact) by reference through their mounts at once, header then tensors shuffled", len(c.nodes)),
		Outcome: "every byte matches the artifact's digest",
		Figure:  fmt.Sprintf("registry sent %.2f× the model", float64(egress)/float64(burst.size))})
	if limit := burst.size + burst.size/5; egress > limit {
		t.Errorf("the registry sent %s while %d nodes read a %s model at once; want at most 1.2× (%s)", human(egress), len(c.nodes), human(burst.size), human(limit))
	}
}

// firstBytes is how long a GET of the first n bytes of u takes from n's
// namespace.
func (c *cluster) firstBytes(ctx context.Context, nd *node, u string, n int64) (time.Duration, error) {
	out, err := sh(ctx, nsExec(nd.ns, c.bin.client, "first", "-url", u, "-n", fmt.Sprint(n))...)
	if err != nil {
		return 0, err
	}
	var r struct {
		Seconds float64 `json:"seconds"`
	}
	if err := json.Unmarshal([]byte(lastLine(out)), &r); err != nil {
		return 0, fmt.Errorf("e2eclient first: %q: %v", out, err)
	}
	return time.Duration(r.Seconds * float64(time.Second)), nil
}
