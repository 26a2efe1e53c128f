package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/peerd-project/peerd/transfer"
	"github.com/peerd-project/peerd/web"
)

// measureTimeout bounds one measurement: a pull of a large image through a
// slow registry should report, not hang the page.
const measureTimeout = 10 * time.Minute

// measure pulls ref through this node's own /v2/ mirror, the way containerd
// does (?ns=<registry>), reading every blob of the node's platform to the
// end, and reports per blob where its bytes came from (the transfer log of
// the mirror's answers). A reference whose digest names a blob, not a
// manifest, measures that one blob.
func (a *app) measure(ctx context.Context, ref string) (web.Measurement, error) {
	m := web.Measurement{Ref: ref, Started: time.Now()}
	r, err := name.ParseReference(strings.TrimSpace(ref))
	if err != nil {
		return m, fmt.Errorf("reference %q: %w", ref, err)
	}
	ctx, cancel := context.WithTimeout(ctx, measureTimeout)
	defer cancel()
	rt := &mirrorTransport{
		mirror:   mirrorHostPort(a.cfg.HTTPAddr),
		registry: r.Context().RegistryStr(),
		ns:       nsOf(r.Context().RegistryStr()),
		base:     &http.Transport{ResponseHeaderTimeout: time.Minute},
	}
	defer rt.base.CloseIdleConnections()
	client := &http.Client{Transport: rt}
	var blobs []v1.Descriptor
	platform := remote.WithPlatform(v1.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH})
	desc, err := remote.Get(r, remote.WithContext(ctx), remote.WithTransport(rt), platform)
	if err != nil && !isDigest(r) {
		// The mirror resolves a tag only when containerd or a peer knows
		// it; containerd then asks the registry itself, and so does this.
		d, herr := remote.Head(r, remote.WithContext(ctx))
		if herr != nil {
			return m, fmt.Errorf("resolve %s: through this node's mirror: %v; at the registry: %w", ref, err, herr)
		}
		r = r.Context().Digest(d.Digest.String())
		desc, err = remote.Get(r, remote.WithContext(ctx), remote.WithTransport(rt), platform)
	}
	switch {
	case err == nil:
		if blobs, err = blobsOf(desc); err != nil {
			return m, err
		}
	case isDigest(r):
		// Not a manifest: the digest may be a blob of the repository.
		h, herr := v1.NewHash(r.Identifier())
		if herr != nil {
			return m, herr
		}
		blobs = []v1.Descriptor{{Digest: h, Size: -1}}
	default:
		return m, fmt.Errorf("resolve %s through this node's mirror: %w", ref, err)
	}
	for _, d := range blobs {
		lm := web.LayerMeasure{Digest: d.Digest.String(), MediaType: string(d.MediaType), Size: d.Size}
		start := time.Now()
		n, err := readBlob(ctx, client, rt.registry, r.Context().RepositoryStr(), d.Digest.String())
		lm.Duration = time.Since(start)
		if lm.Size < 0 {
			lm.Size = n
		}
		if err != nil {
			lm.Error = err.Error()
		}
		lm.Bytes, lm.Peers = a.servedSince(start, d.Digest.String())
		m.Total.Add(lm.Bytes)
		m.Layers = append(m.Layers, lm)
		if ctx.Err() != nil {
			m.Error = "stopped: " + ctx.Err().Error()
			break
		}
	}
	m.Duration = time.Since(m.Started)
	return m, nil
}

// blobsOf lists the config and layers of the image desc names (for an
// index, the node's platform's), with the manifest itself first.
func blobsOf(desc *remote.Descriptor) ([]v1.Descriptor, error) {
	img, err := desc.Image()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", desc.Digest, err)
	}
	mf, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	out := []v1.Descriptor{mf.Config}
	return append(out, mf.Layers...), nil
}

func isDigest(r name.Reference) bool {
	_, ok := r.(name.Digest)
	return ok
}

// readBlob GETs a blob through the mirror to the end and returns its length.
func readBlob(ctx context.Context, c *http.Client, registry, repo, digest string) (int64, error) {
	u := "https://" + registry + "/v2/" + repo + "/blobs/" + digest
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return 0, fmt.Errorf("mirror answered %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	return io.Copy(io.Discard, resp.Body)
}

// servedSince sums the /v2/ transfers of key that started at or after t.
func (a *app) servedSince(t time.Time, key string) (transfer.Bytes, []string) {
	var b transfer.Bytes
	var peers []string
	for _, r := range a.transfers.List() {
		if r.Face != transfer.FaceOCI || r.Key != key || r.Start.Before(t) {
			continue
		}
		b.Add(r.Bytes)
		for _, p := range r.Peers {
			if !slices.Contains(peers, p) {
				peers = append(peers, p)
			}
		}
	}
	return b, peers
}

// nsOf is the registry name containerd sends in ?ns= (go-containerregistry
// calls Docker Hub index.docker.io).
func nsOf(registry string) string {
	if registry == name.DefaultRegistry {
		return "docker.io"
	}
	return registry
}

// mirrorTransport sends the registry's API requests to this node's mirror,
// with the registry in ?ns=, as containerd's hosts.toml does; requests to
// any other host (a token service) go out unchanged.
type mirrorTransport struct {
	mirror, registry, ns string
	base                 *http.Transport
}

var errNoRedirect = errors.New("the mirror redirected a measurement request")

func (t *mirrorTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if !strings.EqualFold(req.URL.Host, t.registry) {
		return t.base.RoundTrip(req)
	}
	r := req.Clone(req.Context())
	u := *req.URL
	u.Scheme, u.Host = "http", t.mirror
	q := u.Query()
	q.Set("ns", t.ns)
	u.RawQuery = q.Encode()
	r.URL, r.Host = &u, t.mirror
	resp, err := t.base.RoundTrip(r)
	if err == nil && resp.StatusCode >= 300 && resp.StatusCode < 400 {
		resp.Body.Close()
		return nil, fmt.Errorf("%w: %s", errNoRedirect, (&url.URL{Path: u.Path}).String())
	}
	return resp, err
}
