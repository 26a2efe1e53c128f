// Command mkimage writes peerd's multi-platform OCI image as an OCI layout
// (and optionally pushes it) from binaries `make image` built. No container
// engine or daemon is needed.
//
//	mkimage -out bin/image -version v1.2.3 -revision <commit> \
//	  -bin linux/amd64=bin/image-build/peerd-linux-amd64 -bin linux/arm64=...
package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/peerd-project/peerd/internal/ociimage"
)

type bins []ociimage.Platform

func (b *bins) String() string { return fmt.Sprint(*b) }
func (b *bins) Set(s string) error {
	plat, path, ok := strings.Cut(s, "=")
	osName, arch, ok2 := strings.Cut(plat, "/")
	if !ok || !ok2 || path == "" || osName == "" || arch == "" {
		return fmt.Errorf("want os/arch=path, got %q", s)
	}
	*b = append(*b, ociimage.Platform{OS: osName, Arch: arch, Binary: path})
	return nil
}

func main() {
	var platforms bins
	out := flag.String("out", "bin/image", "OCI layout folder to write (replaced)")
	version := flag.String("version", "", "label org.opencontainers.image.version")
	revision := flag.String("revision", "", "label org.opencontainers.image.revision (git commit)")
	ca := flag.String("ca", ociimage.CABundlePath, "CA bundle copied into the image")
	epoch := flag.String("epoch", os.Getenv("SOURCE_DATE_EPOCH"), "timestamp of every file and the config, seconds since 1970 (default $SOURCE_DATE_EPOCH)")
	push := flag.String("push", "", "also push the index to this reference (credentials from the Docker config)")
	releaseCheck := flag.String("release-check", "", "instead of building: check the chart in this folder, the layout at -out and -version agree")
	flag.Var(&platforms, "bin", "os/arch=path of a static peerd binary; repeat per platform")
	flag.Parse()

	if *releaseCheck != "" {
		if err := ociimage.ReleaseCheck(*releaseCheck, *out, *version); err != nil {
			fmt.Fprintln(os.Stderr, "release-check:", err)
			os.Exit(1)
		}
		fmt.Printf("release-check: chart %s, image %s and version %s agree\n", *releaseCheck, *out, *version)
		return
	}
	if *epoch == "" {
		fail("no timestamp: set SOURCE_DATE_EPOCH or -epoch (make image uses the commit time)")
	}
	secs, err := strconv.ParseInt(*epoch, 10, 64)
	if err != nil {
		fail("bad -epoch %q: %v", *epoch, err)
	}
	idx, err := ociimage.Build(ociimage.Options{
		Platforms: platforms, CABundle: *ca, Version: *version, Revision: *revision,
		Created: time.Unix(secs, 0).UTC(),
	})
	if err != nil {
		fail("%v", err)
	}
	if err := os.RemoveAll(*out); err != nil {
		fail("%v", err)
	}
	lp, err := layout.Write(*out, empty.Index)
	if err != nil {
		fail("write %s: %v", *out, err)
	}
	ref := ociimage.Repository + ":" + ociimage.Tag(*version)
	if err := lp.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		ociimage.RefNameAnnotation: ref,
	})); err != nil {
		fail("write %s: %v", *out, err)
	}
	d, _ := idx.Digest()
	fmt.Printf("mkimage: %s written to %s (index %s)\n", ref, *out, d)
	if *push != "" {
		r, err := name.ParseReference(*push)
		if err != nil {
			fail("bad -push %q: %v", *push, err)
		}
		if err := remote.WriteIndex(r, idx, remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
			fail("push %s: %v", r, err)
		}
		fmt.Printf("mkimage: pushed %s@%s\n", r, d)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "mkimage: "+format+"\n", args...)
	os.Exit(1)
}
