package e2e

import (
	"bytes"
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
	"slices"
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
	ref    string // <registry>/<repository>:<tag>, as the mount's oci folder names it
	digest string // model.safetensors's
	size   int64  // model.safetensors's
	header []byte // the first bytes: 8 (the JSON's length) + the header's JSON
	// tensors is each tensor's SHA-256 by its offset in the file: a reader
	// checks every byte without holding the whole file (8 readers of a
	// 1 GiB model would need 8 GiB).
	tensors map[int64][sha256.Size]byte
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
	m := model{header: binary.LittleEndian.AppendUint64(nil, uint64(len(hj))), tensors: map[int64][sha256.Size]byte{}}
	m.header = append(m.header, hj...)
	md, err := writeBlob(blobs, func(w io.Writer) error {
		if _, err := w.Write(m.header); err != nil {
			return err
		}
		// One random stream cut into tensors, each hashed on its own.
		rr := randReader(seed * 7919)
		for i := range int64(modelTensors) {
			h := sha256.New()
			if _, err := io.CopyN(io.MultiWriter(w, h), rr, per); err != nil {
				return err
			}
			m.tensors[int64(len(m.header))+i*per] = [sha256.Size]byte(h.Sum(nil))
		}
		return nil
	})
	if err != nil {
		return model{}, "", err
	}
	m.digest, m.size = md.Digest, md.Size
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

// pushModel generates a model of about size bytes and pushes it to the
// registry as e2e/<name>:v1.
func (c *cluster) pushModel(ctx context.Context, name string, size int64, seed uint64) model {
	c.t.Helper()
	dir := filepath.Join(c.dir, "models", name)
	m, digest, err := generateModel(dir, size, seed)
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

// readHeader opens a model.safetensors and reads its header the way a model
// server does: the JSON's length, then the JSON; the bytes must be the
// model's. The file stays open for the caller when f is not nil.
func readHeader(path string, m model) (f *os.File, took time.Duration, err error) {
	start := time.Now()
	if f, err = os.Open(path); err != nil {
		return nil, 0, err
	}
	var n [8]byte
	if _, err := f.ReadAt(n[:], 0); err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("header length: %w", err)
	}
	hl := int64(binary.LittleEndian.Uint64(n[:]))
	if hl <= 0 || 8+hl > m.size {
		f.Close()
		return nil, 0, fmt.Errorf("header length %d of a %d-byte file", hl, m.size)
	}
	hj := make([]byte, hl)
	if _, err := f.ReadAt(hj, 8); err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("header: %w", err)
	}
	took = time.Since(start)
	if got := append(n[:], hj...); !bytes.Equal(got, m.header) {
		f.Close()
		return nil, 0, fmt.Errorf("the header read (%d bytes) is not the model's (%d bytes)", len(got), len(m.header))
	}
	return f, took, nil
}

// readModel reads a model.safetensors the way a model server loads it:
// the header first, then every tensor in its own (shuffled) order; every
// tensor must hash to the one generated.
func readModel(path string, m model, seed uint64) (modelRead, error) {
	start := time.Now()
	f, header, err := readHeader(path, m)
	if err != nil {
		return modelRead{}, err
	}
	defer f.Close()
	r := modelRead{header: header}
	var meta map[string]json.RawMessage
	if err := json.Unmarshal(m.header[8:], &meta); err != nil {
		return r, fmt.Errorf("header JSON: %w", err)
	}
	type tensor struct{ begin, end int64 }
	var ts []tensor
	for name, raw := range meta {
		if name == "__metadata__" {
			continue
		}
		var t struct {
			Offsets []int64 `json:"data_offsets"`
		}
		if err := json.Unmarshal(raw, &t); err != nil || len(t.Offsets) != 2 {
			return r, fmt.Errorf("tensor %s: %v", name, err)
		}
		ts = append(ts, tensor{int64(len(m.header)) + t.Offsets[0], int64(len(m.header)) + t.Offsets[1]})
	}
	if len(ts) != len(m.tensors) {
		return r, fmt.Errorf("the header names %d tensors, the model has %d", len(ts), len(m.tensors))
	}
	sort.Slice(ts, func(i, j int) bool { return ts[i].begin < ts[j].begin })
	rand.New(rand.NewPCG(seed, seed^0x5eed)).Shuffle(len(ts), func(i, j int) { ts[i], ts[j] = ts[j], ts[i] })
	var buf []byte
	for _, t := range ts {
		buf = slices.Grow(buf[:0], int(t.end-t.begin))[:t.end-t.begin]
		if _, err := f.ReadAt(buf, t.begin); err != nil {
			return r, fmt.Errorf("tensor at %d: %w", t.begin, err)
		}
		if sha256.Sum256(buf) != m.tensors[t.begin] {
			return r, fmt.Errorf("the tensor at %d (%d bytes) is not the model's", t.begin, len(buf))
		}
	}
	r.total = time.Since(start)
	return r, nil
}

// coldHeaders is how many cold artifacts scenario 7 times its first header
// read on: the goal is a p50.
const coldHeaders = 9

// modelPath is where n's mount shows m's model.safetensors.
func modelPath(n *node, m model) string {
	reg, rest, _ := strings.Cut(m.ref, "/")
	repo, tag, _ := strings.Cut(rest, ":")
	return filepath.Join(n.mount, "oci", reg, filepath.Dir(repo), filepath.Base(repo)+":"+tag, "model.safetensors")
}

// Scenario 7: a model as an OCI artifact, read through the mount by
// reference (<mount>/oci/<registry>/e2e/<name>:v1/model.safetensors).
// First the cold header: on small artifacts no node has seen, each node in
// turn reads the header through its mount, beside the registry's own first
// bytes of the same blob from the same namespace. Then one node reads a
// whole model alone, then all nodes at once read another: every byte
// matches, and the registry sends about one copy.
func (c *cluster) modelBurst(t *testing.T) {
	c.need(t, "p2p", "fuse")
	ctx := context.Background()
	colds := make([]model, coldHeaders)
	for i := range colds {
		colds[i] = c.pushModel(ctx, fmt.Sprintf("model-cold-%d", i), 8<<20, uint64(100+i))
	}
	var viaMount, direct, added []time.Duration
	for i, m := range colds {
		n := c.nodes[i%len(c.nodes)]
		_, rest, _ := strings.Cut(m.ref, "/")
		repo, _, _ := strings.Cut(rest, ":")
		// The registry's first answer for a blob just pushed is slower than
		// the ones after it; an untimed byte first, so that neither timed
		// read pays for that.
		u := "http://" + registryID + "/v2/" + repo + "/blobs/" + m.digest
		if _, err := c.firstBytes(ctx, n, u, 1); err != nil {
			t.Fatal(err)
		}
		d, err := c.firstBytes(ctx, n, u, int64(len(m.header)))
		if err != nil {
			t.Fatal(err)
		}
		f, took, err := readHeader(modelPath(n, m), m)
		if err != nil {
			t.Fatalf("%s: cold header of %s: %v", n.name(), m.ref, err)
		}
		f.Close()
		viaMount, direct, added = append(viaMount, took), append(direct, d), append(added, took-d)
	}
	mount50, _ := stats(viaMount)
	direct50, _ := stats(direct)
	added50, addedMax := stats(added)

	lone := c.pushModel(ctx, "model-lone", c.cfg.ImageSize, 71)
	e0 := c.egress()
	alone, err := readModel(modelPath(c.nodes[0], lone), lone, 1)
	if err != nil {
		t.Fatalf("node 1 alone: %v", err)
	}
	loneEgress := c.egress() - e0

	burst := c.pushModel(ctx, "model-burst", c.cfg.ImageSize, 72)
	e0, s0 := c.egress(), c.peerServed()
	reads := make([]modelRead, len(c.nodes))
	errs := make([]error, len(c.nodes))
	var wg sync.WaitGroup
	for i, n := range c.nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			reads[i], errs[i] = readModel(modelPath(n, burst), burst, uint64(i+2))
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
	ms := func(d time.Duration) string { return d.Round(100 * time.Microsecond).String() }
	c.report(row{scenario: "7-model-burst", nodes: len(c.nodes), size: burst.size, first: alone.total, p50: p50, max: mx,
		egress: egress, peerServed: c.peerServed() - s0,
		note: fmt.Sprintf("model.safetensors by reference through the mount, header then %d tensors shuffled; slowest %.2f× one node alone (egress %.2f×); cold header p50 %s vs the registry's own %s, added p50 %s max %s (%d cold artifacts); burst headers p50 %s",
			modelTensors, mx.Seconds()/alone.total.Seconds(), float64(loneEgress)/float64(lone.size),
			ms(mount50), ms(direct50), ms(added50), ms(addedMax), len(colds), ms(h50))})
	reliability.Record(t, reliability.Row{Area: "models",
		Case:    fmt.Sprintf("%d nodes read a model (OCI artifact) by reference through their mounts at once, header then tensors shuffled", len(c.nodes)),
		Outcome: "every byte matches the artifact's digest",
		Figure:  fmt.Sprintf("registry sent %.2f× the model", float64(egress)/float64(burst.size))})
	if limit := burst.size + burst.size/5; egress > limit {
		t.Errorf("the registry sent %s while %d nodes read a %s model at once; want at most 1.2× (%s)", human(egress), len(c.nodes), human(burst.size), human(limit))
	}
}

// Scenario 8: `peerd warm <reference>` on node 1, then on every other node
// at once: the registry sends about one copy, and afterwards every node
// reads the whole model through its mount from its own cache (the
// registry sends at most the tag's manifest again).
func (c *cluster) modelWarm(t *testing.T) {
	c.need(t, "p2p", "fuse")
	ctx := context.Background()
	m := c.pushModel(ctx, "model-warm", c.cfg.ImageSize, 73)
	warm := func(n *node) (time.Duration, error) {
		start := time.Now()
		out, err := sh(ctx, nsExec(n.ns, c.bin.peerd, "warm", "--plain", "--http-addr", peerdHTTP, m.ref)...)
		if err != nil {
			return 0, fmt.Errorf("%s: peerd warm: %v\n%s", n.name(), err, out)
		}
		if !strings.Contains(out, "warmed "+m.ref+": ") {
			return 0, fmt.Errorf("%s: peerd warm printed no summary:\n%s", n.name(), out)
		}
		t.Logf("%s: %s", n.name(), lastLine(out))
		return time.Since(start), nil
	}
	e0, s0 := c.egress(), c.peerServed()
	first, err := warm(c.nodes[0])
	if err != nil {
		t.Fatal(err)
	}
	firstEgress := c.egress() - e0
	ds, err := concurrently(c.nodes[1:], warm)
	if err != nil {
		t.Fatal(err)
	}
	egress := c.egress() - e0
	served := c.peerServed() - s0

	e1 := c.egress()
	if _, err := concurrently(c.nodes, func(n *node) (time.Duration, error) {
		r, err := readModel(modelPath(n, m), m, 9)
		if err != nil {
			return 0, fmt.Errorf("%s: reading the warmed model: %w", n.name(), err)
		}
		return r.total, nil
	}); err != nil {
		t.Fatal(err)
	}
	afterEgress := c.egress() - e1
	p50, mx := stats(ds)
	c.report(row{scenario: "8-model-warm", nodes: len(c.nodes), size: m.size, first: first, p50: p50, max: mx,
		egress: egress, peerServed: served,
		note: fmt.Sprintf("peerd warm on node 1 (registry %.2f× the model), then on the others at once; reading the model through every mount afterwards took %s from the registry",
			float64(firstEgress)/float64(m.size), human(afterEgress))})
	if limit := m.size + m.size/5; egress > limit {
		t.Errorf("warming %d nodes made the registry send %s for a %s model; want at most 1.2× (%s)", len(c.nodes), human(egress), human(m.size), human(limit))
	}
	// Only manifests and TCP/IP overhead may cross after the warm.
	if limit := int64(1<<20) + m.size/100; afterEgress > limit {
		t.Errorf("after every node warmed the model, reading it through the mounts made the registry send %s; want at most %s: the caches should hold it", human(afterEgress), human(limit))
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
