// Package ociimage builds peerd's container image without a container
// engine: one static binary on a minimal base made here (CA bundle,
// /etc/passwd and /etc/group with the non-root user, /tmp), as a
// multi-platform OCI image index. deploy/Dockerfile builds the same image
// with Docker; dockerfile_test.go checks the two agree.
package ociimage

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"sort"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// What the image is, shared with deploy/Dockerfile and the Helm chart (the
// tests in this package check all three agree).
const (
	// BinaryPath is where the binary lives in the image (the Dockerfile's COPY target).
	BinaryPath = "/usr/local/bin/peerd"
	// UID and GID of the image's non-root user, "nonroot" as on distroless.
	UID, GID = 65532, 65532
	UserName = "nonroot"
	// CABundlePath is where Go's crypto/x509 looks first on Linux.
	CABundlePath = "/etc/ssl/certs/ca-certificates.crt"
	// Source is the project's repository (label org.opencontainers.image.source, Chart.yaml home).
	Source = "https://github.com/peerd-project/peerd"
	// Repository is the image's published name (the chart's image.repository).
	Repository = "ghcr.io/peerd-project/peerd"
)

// Entrypoint, Cmd and ExposedPorts equal the Dockerfile's ENTRYPOINT, CMD and EXPOSE.
var (
	Entrypoint = []string{BinaryPath}
	Cmd        = []string{"run"}
	Ports      = []string{"30000/tcp", "30001/tcp", "30002/tcp"}
)

// Platform is one binary of the index.
type Platform struct {
	OS, Arch string
	Binary   string // path of the static binary built for OS/Arch
}

// Options describe one build.
type Options struct {
	Platforms []Platform
	CABundle  string    // the build machine's CA bundle, copied into the image
	Version   string    // label org.opencontainers.image.version
	Revision  string    // label org.opencontainers.image.revision (the git commit)
	Created   time.Time // every timestamp in the image: reproducible builds
}

// Labels returns the image's OCI labels.
func (o Options) Labels() map[string]string {
	return map[string]string{
		"org.opencontainers.image.source":   Source,
		"org.opencontainers.image.version":  o.Version,
		"org.opencontainers.image.revision": o.Revision,
		"org.opencontainers.image.title":    "peerd",
	}
}

// Build returns the multi-platform index. The same inputs give the same
// digests: every file has the Created time, owners and modes are fixed, and
// entries are written in a fixed order.
func Build(o Options) (v1.ImageIndex, error) {
	if len(o.Platforms) == 0 {
		return nil, fmt.Errorf("no platform to build")
	}
	if o.Version == "" {
		return nil, fmt.Errorf("no version: the image's version label must say what it holds")
	}
	ca, err := os.ReadFile(o.CABundle)
	if err != nil {
		return nil, fmt.Errorf("CA bundle: %w (install the ca-certificates package, or pass another bundle)", err)
	}
	base, err := baseLayer(ca, o.Created)
	if err != nil {
		return nil, err
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, p := range o.Platforms {
		img, err := buildImage(o, p, base)
		if err != nil {
			return nil, fmt.Errorf("%s/%s: %w", p.OS, p.Arch, err)
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add:        img,
			Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: p.OS, Architecture: p.Arch}},
		})
	}
	return idx, nil
}

func buildImage(o Options, p Platform, base v1.Layer) (v1.Image, error) {
	bin, err := os.ReadFile(p.Binary)
	if err != nil {
		return nil, err
	}
	binLayer, err := layer(o.Created, []entry{
		{name: "usr/", dir: true, mode: 0o755},
		{name: "usr/local/", dir: true, mode: 0o755},
		{name: "usr/local/bin/", dir: true, mode: 0o755},
		{name: BinaryPath[1:], mode: 0o755, data: bin},
	})
	if err != nil {
		return nil, err
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img,
		mutate.Addendum{Layer: base, History: v1.History{Created: v1.Time{Time: o.Created}, CreatedBy: "peerd base: CA bundle, passwd, group, /tmp", Comment: "internal/ociimage"}},
		mutate.Addendum{Layer: binLayer, History: v1.History{Created: v1.Time{Time: o.Created}, CreatedBy: "COPY peerd " + BinaryPath, Comment: "internal/ociimage"}},
	)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = p.OS, p.Arch
	cf.Created = v1.Time{Time: o.Created}
	cf.Config = Config(o.Labels())
	return mutate.ConfigFile(img, cf)
}

// Config is the image's runtime configuration (user, entrypoint, env...).
func Config(labels map[string]string) v1.Config {
	ports := map[string]struct{}{}
	for _, p := range Ports {
		ports[p] = struct{}{}
	}
	return v1.Config{
		User:         fmt.Sprintf("%d:%d", UID, GID),
		Entrypoint:   Entrypoint,
		Cmd:          Cmd,
		ExposedPorts: ports,
		Env: []string{
			"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
			"SSL_CERT_FILE=" + CABundlePath,
		},
		WorkingDir: "/home/" + UserName,
		Labels:     labels,
	}
}

// Files lists the paths the base layer holds, for the Dockerfile check.
func Files() []string {
	return []string{"/etc/passwd", "/etc/group", "/etc/nsswitch.conf", CABundlePath, "/tmp", "/home/" + UserName, BinaryPath}
}

func baseLayer(ca []byte, created time.Time) (v1.Layer, error) {
	passwd := fmt.Sprintf("root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n%s:x:%d:%d:%s:/home/%s:/sbin/nologin\n", UserName, UID, GID, UserName, UserName)
	group := fmt.Sprintf("root:x:0:\nnobody:x:65534:\ntty:x:5:\n%s:x:%d:\n", UserName, GID)
	return layer(created, []entry{
		{name: "etc/", dir: true, mode: 0o755},
		{name: "etc/group", mode: 0o644, data: []byte(group)},
		// Go's resolver reads it to prefer /etc/hosts over DNS, as glibc would.
		{name: "etc/nsswitch.conf", mode: 0o644, data: []byte("hosts: files dns\n")},
		{name: "etc/passwd", mode: 0o644, data: []byte(passwd)},
		{name: "etc/ssl/", dir: true, mode: 0o755},
		{name: "etc/ssl/certs/", dir: true, mode: 0o755},
		{name: CABundlePath[1:], mode: 0o644, data: ca},
		{name: "home/", dir: true, mode: 0o755},
		{name: "home/" + UserName + "/", dir: true, mode: 0o700, uid: UID, gid: GID},
		{name: "root/", dir: true, mode: 0o700},
		{name: "tmp/", dir: true, mode: 0o1777},
	})
}

type entry struct {
	name     string
	dir      bool
	mode     int64
	uid, gid int
	data     []byte
}

// layer writes entries as an uncompressed tar (sorted, every time equal to
// created, numeric owners only) and wraps it as a gzip'd OCI layer.
func layer(created time.Time, entries []entry) (v1.Layer, error) {
	sort.Slice(entries, func(i, j int) bool { return entries[i].name < entries[j].name })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		// USTAR: no PAX records, so no access or change times besides mtime.
		h := &tar.Header{Name: e.name, Mode: e.mode, Uid: e.uid, Gid: e.gid, ModTime: created, Format: tar.FormatUSTAR}
		if e.dir {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("tar %s: %w", e.name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}, tarball.WithMediaType(types.OCILayer))
}
