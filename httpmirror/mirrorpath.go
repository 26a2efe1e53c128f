package httpmirror

// The mirror location containers-registries.conf clients use.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/upstream"
)

// MirrorPathPrefix starts the mirror location peerd registries-config
// writes for a registry: <mirror>/peerd/<MirrorPathName(registry)>
// (containers-registries.conf rewrites the repository path under it instead
// of adding ?ns=).
const MirrorPathPrefix = "peerd"

// MirrorPathName is a registry (host[:port]) as one path component of an
// image reference, which allows no ':' or brackets: "10.0.0.5:5000" →
// "10.0.0.5-5000", "[fd00::1]:5000" → "fd00--1-5000".
func MirrorPathName(registry string) string {
	r := strings.NewReplacer("[", "", "]", "", ":", "-")
	return r.Replace(strings.ToLower(registry))
}

// mirrorPath splits /v2/peerd/<registry>/<rest> of a request without ?ns=.
func mirrorPath(r *http.Request) (registry, rest string, ok bool) {
	if r.URL.Query().Has("ns") {
		return "", "", false
	}
	p, ok := strings.CutPrefix(r.URL.Path, "/v2/"+MirrorPathPrefix+"/")
	if !ok {
		return "", "", false
	}
	registry, rest, ok = strings.Cut(p, "/")
	return registry, rest, ok && registry != "" && rest != ""
}

// tagTimeout bounds asking a registry what a tag points to.
const tagTimeout = 30 * time.Second

// resolveAtRegistry asks the registry (pull-through) which manifest tag
// points to now. It serves clients of the mirror path only: containers/image
// takes a whole image from the first source that answers its manifest, so a
// tag this node cannot resolve would send every blob of the pull past peerd
// to the registry. The registry stays the authority for the tag; the
// manifest and blobs then come by digest through the cache and peers. The
// client's Accept and Authorization go to the registry alone; a 401 comes
// back as an upstream.StatusError, so its challenge can be relayed.
func (h *ociHandler) resolveAtRegistry(r *http.Request, registry, repo, tag string) (blob.Key, error) {
	base, ok := h.cfg.PullThrough[registry]
	if !ok || h.cfg.Upstream == nil {
		return "", fmt.Errorf("tag %s:%s: pull-through is off for %s: %w", repo, tag, registry, blob.ErrNotFound)
	}
	ctx, cancel := context.WithTimeout(r.Context(), tagTimeout)
	defer cancel()
	u := base + "/v2/" + repo + "/manifests/" + tag
	ask := func(method string) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, method, u, nil)
		if err != nil {
			return nil, fmt.Errorf("tag %s:%s: %w", repo, tag, blob.ErrNotFound)
		}
		accept := r.Header.Values("Accept")
		if len(accept) == 0 {
			accept = []string{manifestAccept}
		}
		req.Header["Accept"] = accept
		if a := r.Header.Get("Authorization"); a != "" {
			req.Header.Set("Authorization", a)
		}
		req.Header.Set(upstream.LoopHeader, "1")
		resp, err := h.cfg.Upstream.HTTPClient().Do(req)
		if err != nil {
			return nil, fmt.Errorf("tag %s:%s at %s: %s: %w", repo, tag, registry, upstream.RedactText(err.Error()), blob.ErrNotFound)
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return nil, fmt.Errorf("tag %s:%s: %w", repo, tag, &upstream.StatusError{Code: resp.StatusCode, Status: resp.Status, Header: resp.Header})
		}
		return resp, nil
	}
	// HEAD first: the registry names the digest without sending the body.
	resp, err := ask(http.MethodHead)
	if err != nil {
		return "", err
	}
	resp.Body.Close()
	if k, err := blob.ParseDigest(resp.Header.Get("Docker-Content-Digest")); err == nil {
		return k, nil
	}
	if resp, err = ask(http.MethodGet); err != nil {
		return "", err
	}
	defer resp.Body.Close()
	m, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestBytes+1))
	if err != nil {
		return "", fmt.Errorf("tag %s:%s: reading the manifest: %w", repo, tag, blob.ErrNotFound)
	}
	if len(m) > maxManifestBytes {
		return "", fmt.Errorf("tag %s:%s: manifest over %d bytes: %w", repo, tag, maxManifestBytes, blob.ErrNotFound)
	}
	sum := sha256.Sum256(m)
	return blob.Key("sha256:" + hex.EncodeToString(sum[:])), nil
}
