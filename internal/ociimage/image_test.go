package ociimage

import (
	"archive/tar"
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
)

const (
	dockerfile = "../../deploy/Dockerfile"
	chartDir   = "../../deploy/helm/peerd"
)

// finalStage is what the Dockerfile's last stage says about the image.
type finalStage struct {
	from       string
	user       string
	entrypoint []string
	cmd        []string
	expose     []string
	copies     []string // COPY destinations
}

// parseDockerfile reads the instructions of the last stage; JSON-form
// ENTRYPOINT and CMD only (the shell form would run /bin/sh, which the image lacks).
func parseDockerfile(t *testing.T, path string) finalStage {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st finalStage
	sc := bufio.NewScanner(f)
	var line string
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(l, "#") {
			continue
		}
		if s, ok := strings.CutSuffix(l, "\\"); ok {
			line += s + " "
			continue
		}
		line += l
		instr, rest, _ := strings.Cut(strings.TrimSpace(line), " ")
		line = ""
		rest = strings.TrimSpace(rest)
		switch strings.ToUpper(instr) {
		case "FROM":
			st = finalStage{from: strings.Fields(rest)[0]}
		case "USER":
			st.user = rest
		case "ENTRYPOINT", "CMD":
			var v []string
			if err := json.Unmarshal([]byte(rest), &v); err != nil {
				t.Fatalf("%s %s: not the JSON form: %v", instr, rest, err)
			}
			if strings.ToUpper(instr) == "CMD" {
				st.cmd = v
			} else {
				st.entrypoint = v
			}
		case "EXPOSE":
			for _, p := range strings.Fields(rest) {
				if !strings.Contains(p, "/") {
					p += "/tcp"
				}
				st.expose = append(st.expose, p)
			}
		case "COPY", "ADD":
			var args []string
			for _, a := range strings.Fields(rest) {
				if !strings.HasPrefix(a, "--") {
					args = append(args, a)
				}
			}
			st.copies = append(st.copies, args[len(args)-1])
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return st
}

// distrolessNonroot is what the Dockerfile's base provides that the image
// built here must provide too (gcr.io/distroless/static-debian12:nonroot:
// passwd/group with nonroot 65532, the CA bundle, /tmp, the nonroot home).
const distrolessNonroot = "gcr.io/distroless/static-debian12:nonroot"

func testImage(t *testing.T, created time.Time, platforms ...string) v1.ImageIndex {
	t.Helper()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.crt")
	os.WriteFile(ca, []byte("-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n"), 0o644)
	var ps []Platform
	for _, p := range platforms {
		osName, arch, _ := strings.Cut(p, "/")
		bin := filepath.Join(dir, "peerd-"+arch)
		os.WriteFile(bin, []byte("binary for "+p), 0o755)
		ps = append(ps, Platform{OS: osName, Arch: arch, Binary: bin})
	}
	idx, err := Build(Options{Platforms: ps, CABundle: ca, Version: "v0.1.0", Revision: "abc123", Created: created})
	if err != nil {
		t.Fatal(err)
	}
	return idx
}

type file struct {
	hdr  *tar.Header
	data []byte
}

// flatten returns every file of the image's layers by absolute path.
func flatten(t *testing.T, img v1.Image) map[string]file {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	files := map[string]file{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		files["/"+strings.TrimSuffix(h.Name, "/")] = file{h, b}
	}
	return files
}

// TestDockerfileEquivalent: the image built here and deploy/Dockerfile's
// agree on user, entrypoint, command, ports and files.
func TestDockerfileEquivalent(t *testing.T) {
	df := parseDockerfile(t, dockerfile)
	if df.from != distrolessNonroot {
		t.Fatalf("the Dockerfile's base is %s, not %s: check what it provides (passwd, group, CA bundle, /tmp, home, env) and update baseLayer and this test", df.from, distrolessNonroot)
	}
	created := time.Unix(1700000000, 0).UTC()
	idx := testImage(t, created, "linux/amd64", "linux/arm64")
	err := eachImage(idx, func(p *v1.Platform, cf *v1.ConfigFile) error {
		c := cf.Config
		if c.User != df.user {
			return fmt.Errorf("%s: user %q, Dockerfile USER %q", p, c.User, df.user)
		}
		if !slices.Equal(c.Entrypoint, df.entrypoint) {
			return fmt.Errorf("%s: entrypoint %q, Dockerfile %q", p, c.Entrypoint, df.entrypoint)
		}
		if !slices.Equal(c.Cmd, df.cmd) {
			return fmt.Errorf("%s: cmd %q, Dockerfile %q", p, c.Cmd, df.cmd)
		}
		var ports []string
		for port := range c.ExposedPorts {
			ports = append(ports, port)
		}
		slices.Sort(ports)
		if !slices.Equal(ports, df.expose) {
			return fmt.Errorf("%s: ports %v, Dockerfile EXPOSE %v", p, ports, df.expose)
		}
		if cf.OS != p.OS || cf.Architecture != p.Architecture || !cf.Created.Time.Equal(created) {
			return fmt.Errorf("config says %s/%s created %v, index says %s", cf.OS, cf.Architecture, cf.Created, p)
		}
		for k, want := range map[string]string{"org.opencontainers.image.source": Source, "org.opencontainers.image.version": "v0.1.0", "org.opencontainers.image.revision": "abc123"} {
			if c.Labels[k] != want {
				return fmt.Errorf("%s: label %s = %q, want %q", p, k, c.Labels[k], want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	im, _ := idx.IndexManifest()
	if len(im.Manifests) != 2 {
		t.Fatalf("index has %d manifests, want 2", len(im.Manifests))
	}
	img, _ := idx.Image(im.Manifests[1].Digest)
	files := flatten(t, img)
	for _, dst := range df.copies {
		f, ok := files[dst]
		if !ok || f.hdr.Typeflag != tar.TypeReg || f.hdr.Mode&0o111 == 0 {
			t.Fatalf("the Dockerfile copies to %s; the image has %+v", dst, f.hdr)
		}
		if string(f.data) != "binary for linux/arm64" {
			t.Fatalf("arm64 image holds %q at %s", f.data, dst)
		}
	}
	uid := strings.Split(df.user, ":")[0]
	if !strings.Contains(string(files["/etc/passwd"].data), ":x:"+uid+":") {
		t.Fatalf("/etc/passwd lacks the Dockerfile's user %s:\n%s", uid, files["/etc/passwd"].data)
	}
	if gid := strings.Split(df.user, ":")[1]; !strings.Contains(string(files["/etc/group"].data), ":x:"+gid+":") {
		t.Fatalf("/etc/group lacks the group %s", gid)
	}
	for _, p := range Files() {
		f, ok := files[p]
		if !ok {
			t.Fatalf("the image lacks %s", p)
		}
		if !f.hdr.ModTime.Equal(created) {
			t.Fatalf("%s has time %v, want the build's %v", p, f.hdr.ModTime, created)
		}
	}
	if f := files["/tmp"]; f.hdr.Typeflag != tar.TypeDir || f.hdr.Mode&0o7777 != 0o1777 {
		t.Fatalf("/tmp: %+v, want a directory with mode 1777", f.hdr)
	}
	if f := files["/home/"+UserName]; f.hdr.Uid != UID {
		t.Fatalf("home of %s owned by %d", UserName, f.hdr.Uid)
	}
	if !strings.Contains(string(files[CABundlePath].data), "BEGIN CERTIFICATE") {
		t.Fatal("CA bundle not copied")
	}
}

// TestReproducible: the same inputs give the same digest, and the
// timestamp is an input (two times give two digests).
func TestReproducible(t *testing.T) {
	a := testImage(t, time.Unix(1700000000, 0).UTC(), "linux/amd64")
	b := testImage(t, time.Unix(1700000000, 0).UTC(), "linux/amd64")
	c := testImage(t, time.Unix(1700000001, 0).UTC(), "linux/amd64")
	da, _ := a.Digest()
	db, _ := b.Digest()
	dc, _ := c.Digest()
	if da != db {
		t.Fatalf("same inputs, two digests: %s %s", da, db)
	}
	if da == dc {
		t.Fatal("a different SOURCE_DATE_EPOCH gave the same digest: the timestamp is not applied")
	}
}

func TestBuildBadInput(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "peerd")
	os.WriteFile(bin, []byte("x"), 0o755)
	p := []Platform{{OS: "linux", Arch: "amd64", Binary: bin}}
	for name, o := range map[string]Options{
		"no CA bundle": {Platforms: p, CABundle: filepath.Join(dir, "none.crt"), Version: "v1"},
		"no version":   {Platforms: p, CABundle: bin},
		"no platform":  {CABundle: bin, Version: "v1"},
		"no binary":    {Platforms: []Platform{{OS: "linux", Arch: "amd64", Binary: filepath.Join(dir, "none")}}, CABundle: bin, Version: "v1"},
	} {
		if _, err := Build(o); err == nil {
			t.Errorf("%s: built anyway", name)
		}
	}
}

// copyChart copies Chart.yaml and values.yaml, with edit applied to the named file.
func copyChart(t *testing.T, file, old, new string) string {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{"Chart.yaml", "values.yaml"} {
		b, err := os.ReadFile(filepath.Join(chartDir, f))
		if err != nil {
			t.Fatal(err)
		}
		s := string(b)
		if f == file {
			if !strings.Contains(s, old) {
				t.Fatalf("%s lacks %q", f, old)
			}
			s = strings.Replace(s, old, new, 1)
		}
		os.WriteFile(filepath.Join(dir, f), []byte(s), 0o644)
	}
	return dir
}

// TestReleaseCheck: the chart agrees with the image as it stands, and each
// kind of drift fails the check with its reason.
func TestReleaseCheck(t *testing.T) {
	c, err := ReadChart(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckChart(c); err != nil {
		t.Fatalf("the chart drifted from the image: %v", err)
	}
	version := "v" + c.AppVersion

	// A layout written as make image writes it.
	out := filepath.Join(t.TempDir(), "image")
	writeLayout := func(version string) {
		t.Helper()
		os.RemoveAll(out)
		dir := t.TempDir()
		ca := filepath.Join(dir, "ca.crt")
		os.WriteFile(ca, []byte("ca"), 0o644)
		bin := filepath.Join(dir, "peerd")
		os.WriteFile(bin, []byte("x"), 0o755)
		idx, err := Build(Options{Platforms: []Platform{{"linux", "amd64", bin}}, CABundle: ca, Version: version, Revision: "abc", Created: time.Unix(0, 0)})
		if err != nil {
			t.Fatal(err)
		}
		lp, err := layout.Write(out, empty.Index)
		if err != nil {
			t.Fatal(err)
		}
		if err := lp.AppendIndex(idx, layout.WithAnnotations(map[string]string{RefNameAnnotation: Repository + ":" + Tag(version)})); err != nil {
			t.Fatal(err)
		}
	}
	writeLayout(version)
	if err := ReleaseCheck(chartDir, out, version); err != nil {
		t.Fatalf("release %s: %v", version, err)
	}
	for name, tc := range map[string]struct{ chart, version, want string }{
		"appVersion bumped alone":  {copyChart(t, "Chart.yaml", `appVersion: "`+c.AppVersion+`"`, `appVersion: "9.9.9"`), version, "not the chart's appVersion"},
		"repository renamed":       {copyChart(t, "values.yaml", "repository: "+Repository, "repository: docker.io/someone/peerd"), version, "image.repository"},
		"tag pinned":               {copyChart(t, "values.yaml", `tag: ""`, `tag: "0.0.1"`), version, "image.tag"},
		"home moved":               {copyChart(t, "Chart.yaml", "home: "+Source, "home: https://example.invalid/peerd"), version, "home"},
		"image of another version": {chartDir, "v" + c.AppVersion + "-rc1", "not the chart's appVersion"},
	} {
		err := ReleaseCheck(tc.chart, out, tc.version)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error about %q", name, err, tc.want)
		}
	}
	// The version agrees with the chart, but the image was built from another.
	writeLayout("v0.0.0-other")
	if err := ReleaseCheck(chartDir, out, version); err == nil || !strings.Contains(err.Error(), "chart deploys") {
		t.Errorf("layout of another version: %v", err)
	}
	if err := ReleaseCheck(chartDir, filepath.Join(t.TempDir(), "none"), version); err == nil || !strings.Contains(err.Error(), "make image") {
		t.Errorf("no layout: %v", err)
	}
}
