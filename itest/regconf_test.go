package itest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/peerd-project/peerd/internal/reliability"
	"github.com/peerd-project/peerd/internal/testenv"
)

// A containers/image client (skopeo, the library CRI-O and Podman use)
// reads the drop-in `peerd registries-config` writes and pulls through
// peerd's mirror path: node A pulls an image by digest (the registry's
// bytes, through A), node B pulls it next by tag (peerd resolves the tag at
// the registry, the blobs come from A through the peer network), and the
// registry sends B's pull almost nothing.
func TestRegistriesConfWithARealClient(t *testing.T) {
	skopeo := testenv.LookPath(t, "skopeo", "skopeo")
	reg, img, a, b := registryAndTwoNodes(t, 400<<10, 3<<20+11)

	var imageBytes int64
	for _, l := range img.layers {
		imageBytes += int64(len(l))
	}
	imageBytes += int64(len(img.config))
	pull := func(n *p2pNode, ref string) int64 {
		t.Helper()
		dir := filepath.Join(t.TempDir(), "registries.conf.d")
		out, err := exec.Command(peerdBin, "registries-config", "--conf-dir", dir, "--registries", "http://"+reg.Host, "--mirror", "http://"+n.HTTPAddr).CombinedOutput()
		if err != nil {
			t.Fatalf("registries-config: %v\n%s", err, out)
		}
		conf := filepath.Join(dir, "zz-peerd.conf")
		if b, _ := os.ReadFile(conf); !strings.Contains(string(b), n.HTTPAddr+"/peerd/"+strings.ReplaceAll(reg.Host, ":", "-")) {
			t.Fatalf("drop-in does not name the mirror path:\n%s", b)
		}
		before := reg.blobBytes.Load()
		dst := filepath.Join(t.TempDir(), "img")
		cmd := exec.Command(skopeo, "--registries-conf", conf, "copy", "--src-tls-verify=false",
			"docker://"+reg.Host+"/"+img.repo+ref, "dir:"+dst)
		cmd.Env = append(os.Environ(), "HOME="+t.TempDir())
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s: skopeo copy: %v\n%s", n.Name, err, out)
		}
		for _, d := range append([]string{img.configDigest}, img.layerDigests...) {
			got, err := os.ReadFile(filepath.Join(dst, strings.TrimPrefix(d, "sha256:")))
			if err != nil || Digest(got) != d {
				t.Fatalf("%s: blob %s: %v (digest %s)", n.Name, d, err, Digest(got))
			}
		}
		return reg.blobBytes.Load() - before
	}
	for _, n := range []*p2pNode{a, b} {
		if n.Metric(t, "peerd_runtime_mode", "mode=none") != 1 || n.Metric(t, "peerd_runtime_mode", "mode=containerd") != 0 {
			t.Fatalf("%s runs without containerd but peerd_runtime_mode does not say none", n.Name)
		}
	}
	fromRegA := pull(a, "@"+img.manifestDigest)
	if served := a.Metric(t, "peerd_oci_responses_total", "kind=blob"); served < float64(len(img.layers)) {
		t.Fatalf("A's mirror answered %v blob requests: the client did not use it", served)
	}
	waitMetric(t, a.Node, "peerd_p2p_provides_total", float64(len(img.layers)+1), "result=ok")
	fromRegB := pull(b, ":"+img.tag)
	t.Logf("image %d B: the registry sent %d B for A's pull, %d B for B's", imageBytes, fromRegA, fromRegB)
	if fromRegB > imageBytes/10 {
		t.Fatalf("the registry sent %d B for B's pull, more than 10%% of the image's %d B", fromRegB, imageBytes)
	}
	if got := b.Metric(t, "peerd_p2p_received_bytes_total"); got < float64(imageBytes-int64(len(img.config))) {
		t.Fatalf("B received %v B from peers, want the layers", got)
	}
	reliability.Record(t, reliability.Row{Area: "runtime",
		Case:    "skopeo (containers/image, as CRI-O and Podman) through the drop-in of `peerd registries-config`, two nodes, A by digest, B by tag",
		Outcome: "both pulls through peerd's mirror path; the second from the first node; digests match",
		Figure:  fmt.Sprintf("registry sent %d B for A's pull and %d B for B's, image %d B", fromRegA, fromRegB, imageBytes)})
}
