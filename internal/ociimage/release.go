package ociimage

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"sigs.k8s.io/yaml"
)

// RefNameAnnotation names the index in the layout's index.json (what
// `ctr images import` tags the image as).
const RefNameAnnotation = "org.opencontainers.image.ref.name"

// Tag is the image tag for a version: a release tag's "v" dropped, as the
// chart's appVersion (SemVer) is written.
func Tag(version string) string { return strings.TrimPrefix(version, "v") }

// Chart is what a release must agree on in the Helm chart.
type Chart struct {
	AppVersion string   `json:"appVersion"`
	Home       string   `json:"home"`
	Sources    []string `json:"sources"`
	Image      struct {
		Repository string `json:"repository"`
		Tag        string `json:"tag"`
		Digest     string `json:"digest"`
	} `json:"-"`
}

// ReadChart reads Chart.yaml and values.yaml of the chart in dir.
func ReadChart(dir string) (*Chart, error) {
	c := &Chart{}
	b, err := os.ReadFile(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		return nil, err
	}
	if err := yaml.Unmarshal(b, c); err != nil {
		return nil, fmt.Errorf("Chart.yaml: %w", err)
	}
	b, err = os.ReadFile(filepath.Join(dir, "values.yaml"))
	if err != nil {
		return nil, err
	}
	var v struct {
		Image struct {
			Repository string `json:"repository"`
			Tag        string `json:"tag"`
			Digest     string `json:"digest"`
		} `json:"image"`
	}
	if err := yaml.Unmarshal(b, &v); err != nil {
		return nil, fmt.Errorf("values.yaml: %w", err)
	}
	c.Image = v.Image
	return c, nil
}

// DefaultImage is the reference the chart deploys with its default values.
func (c *Chart) DefaultImage() string {
	tag := c.Image.Tag
	if tag == "" {
		tag = c.AppVersion
	}
	return c.Image.Repository + ":" + tag
}

// CheckChart reports where the chart's defaults disagree with the image this
// package builds: repository, source and the image tag following appVersion.
func CheckChart(c *Chart) error {
	var errs []string
	if c.Image.Repository != Repository {
		errs = append(errs, fmt.Sprintf("values.yaml image.repository is %q, the image is published as %q", c.Image.Repository, Repository))
	}
	if c.Image.Tag != "" {
		errs = append(errs, fmt.Sprintf("values.yaml image.tag is %q: leave it empty so the image follows appVersion", c.Image.Tag))
	}
	if c.Image.Digest != "" {
		errs = append(errs, fmt.Sprintf("values.yaml image.digest is %q: a default digest pins an image appVersion does not name", c.Image.Digest))
	}
	if c.Home != Source {
		errs = append(errs, fmt.Sprintf("Chart.yaml home is %q, the image's source label is %q", c.Home, Source))
	}
	found := false
	for _, s := range c.Sources {
		found = found || s == Source
	}
	if !found {
		errs = append(errs, fmt.Sprintf("Chart.yaml sources %v lack the image's source %q", c.Sources, Source))
	}
	if c.AppVersion == "" || strings.HasPrefix(c.AppVersion, "v") {
		errs = append(errs, fmt.Sprintf("Chart.yaml appVersion %q: want a SemVer without \"v\" (the image tag)", c.AppVersion))
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// ReleaseCheck fails unless the chart in chartDir, the image layout in
// layoutDir and the release version agree: the chart's default image
// reference is the layout's reference, appVersion is the version, and every
// platform's labels carry that version and the project's source.
func ReleaseCheck(chartDir, layoutDir, version string) error {
	c, err := ReadChart(chartDir)
	if err != nil {
		return err
	}
	if err := CheckChart(c); err != nil {
		return err
	}
	if version == "" {
		return fmt.Errorf("no version given")
	}
	if Tag(version) != c.AppVersion {
		return fmt.Errorf("version %s is not the chart's appVersion %s: bump Chart.yaml appVersion (and version) with the release tag", version, c.AppVersion)
	}
	lp, err := layout.FromPath(layoutDir)
	if err != nil {
		return fmt.Errorf("image layout %s: %w (run make image first)", layoutDir, err)
	}
	top, err := lp.ImageIndex()
	if err != nil {
		return err
	}
	im, err := top.IndexManifest()
	if err != nil {
		return err
	}
	if len(im.Manifests) != 1 {
		return fmt.Errorf("image layout %s lists %d entries, want the one index mkimage writes", layoutDir, len(im.Manifests))
	}
	if ref := im.Manifests[0].Annotations[RefNameAnnotation]; ref != c.DefaultImage() {
		return fmt.Errorf("image layout is %q, the chart deploys %q by default", ref, c.DefaultImage())
	}
	idx, err := top.ImageIndex(im.Manifests[0].Digest)
	if err != nil {
		return err
	}
	return eachImage(idx, func(p *v1.Platform, cf *v1.ConfigFile) error {
		l := cf.Config.Labels
		if l["org.opencontainers.image.version"] != version {
			return fmt.Errorf("%s: label version %q, want %q", p, l["org.opencontainers.image.version"], version)
		}
		if l["org.opencontainers.image.source"] != Source {
			return fmt.Errorf("%s: label source %q, want %q", p, l["org.opencontainers.image.source"], Source)
		}
		if l["org.opencontainers.image.revision"] == "" {
			return fmt.Errorf("%s: no revision label", p)
		}
		return nil
	})
}

// eachImage calls f with every platform image's config in idx.
func eachImage(idx v1.ImageIndex, f func(*v1.Platform, *v1.ConfigFile) error) error {
	im, err := idx.IndexManifest()
	if err != nil {
		return err
	}
	if len(im.Manifests) == 0 {
		return fmt.Errorf("the image index lists no platform")
	}
	for _, d := range im.Manifests {
		img, err := idx.Image(d.Digest)
		if err != nil {
			return err
		}
		cf, err := img.ConfigFile()
		if err != nil {
			return err
		}
		if err := f(d.Platform, cf); err != nil {
			return err
		}
	}
	return nil
}
