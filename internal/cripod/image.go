package cripod

import (
	"archive/tar"
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// ImportLayout imports the OCI layout at dir into containerd's k8s.io
// namespace with ctr (as `ctr images import` of an OCI archive), writing the
// archive into the folder work, unpacked into snapshotter.
func ImportLayout(ctr, sock, dir, work, snapshotter string) error {
	archive := filepath.Join(work, filepath.Base(dir)+".tar")
	if err := TarDir(dir, archive); err != nil {
		return err
	}
	out, err := exec.Command(ctr, "--address", sock, "--namespace", "k8s.io", "images", "import",
		"--platform", "linux/"+runtime.GOARCH, "--snapshotter", snapshotter, archive).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images import %s: %v\n%s", archive, err, out)
	}
	return nil
}

// TarDir writes the files under dir as a tar (an OCI archive of a layout).
func TarDir(dir, out string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
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
	if err == nil {
		err = f.Close()
	}
	if err != nil {
		return fmt.Errorf("tar %s: %w", dir, err)
	}
	return nil
}

// PauseLayout writes a one-layer image named ref whose entrypoint is the
// static binary pause (itest/testdata/pause), as an OCI layout dir/pause.
func PauseLayout(pause, dir, ref string) (string, error) {
	data, err := os.ReadFile(pause)
	if err != nil {
		return "", err
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
		return "", err
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
		return "", err
	}
	out := filepath.Join(dir, "pause")
	lp, err := layout.Write(out, empty.Index)
	if err == nil {
		err = lp.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": ref}))
	}
	if err != nil {
		return "", err
	}
	return out, nil
}

// ChartPod renders the chart at chartDir with values (YAML) through helm
// and returns the DaemonSet's pod spec (not a hook's).
func ChartPod(helm, chartDir, values, work string) (corev1.PodSpec, error) {
	vf := filepath.Join(work, "values.yaml")
	if err := os.WriteFile(vf, []byte(values), 0o644); err != nil {
		return corev1.PodSpec{}, err
	}
	cmd := exec.Command(helm, "template", "peerd", chartDir, "--namespace", "peerd", "--values", vf)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+work, "HELM_CONFIG_HOME="+work, "HELM_DATA_HOME="+work, "KUBECONFIG=/nonexistent")
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return corev1.PodSpec{}, fmt.Errorf("helm template: %v\n%s", err, stderr.String())
	}
	r := utilyaml.NewYAMLReader(bufio.NewReader(&out))
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return corev1.PodSpec{}, errors.New("the chart rendered no DaemonSet")
		}
		if err != nil {
			return corev1.PodSpec{}, err
		}
		if !strings.Contains(string(doc), "kind: DaemonSet") {
			continue
		}
		var ds appsv1.DaemonSet
		if err := utilyaml.Unmarshal(doc, &ds); err != nil {
			return corev1.PodSpec{}, fmt.Errorf("the chart's DaemonSet: %w", err)
		}
		if ds.Kind == "DaemonSet" && ds.Annotations["helm.sh/hook"] == "" {
			return ds.Spec.Template.Spec, nil
		}
	}
}
