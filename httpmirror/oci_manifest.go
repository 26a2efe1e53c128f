package httpmirror

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/peerd-project/peerd/blob"
)

func (h *ociHandler) serveManifest(w http.ResponseWriter, r *http.Request, k blob.Key, localOnly bool) {
	ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
	defer cancel()
	var origin blob.Source
	if !localOnly {
		origin = h.origin(r, k, "manifests", http.Header{"Accept": {manifestAccept}})
	}
	body, mt, from, err := h.readManifest(ctx, k, localOnly, origin)
	if err != nil {
		h.missOrChallenge(w, "manifest", "MANIFEST_UNKNOWN", err)
		return
	}
	h.served.WithLabelValues("manifest", from).Inc()
	hd := w.Header()
	hd.Set("Content-Type", mt)
	hd.Set("Content-Length", strconv.Itoa(len(body)))
	hd.Set("Docker-Content-Digest", string(k))
	hd.Set("Etag", `"`+string(k)+`"`)
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write(body)
	}
}

// readManifest reads a whole manifest by digest and checks it.
// origin, when not nil, is the registry to pull it through from.
func (h *ociHandler) readManifest(ctx context.Context, k blob.Key, localOnly bool, origin blob.Source) ([]byte, string, string, error) {
	if h.cfg.Local != nil {
		if b, err := h.cfg.Local.OpenBlob(ctx, k); err == nil {
			defer b.Close()
			body, err := readAllAt(b, b.Size())
			if err != nil {
				return nil, "", "", fmt.Errorf("read %s from containerd: %w", k, err)
			}
			mt, err := manifestMediaType(body, b.MediaType(), k)
			return body, mt, "containerd", err
		}
	}
	if h.cfg.Cache == nil {
		return nil, "", "", fmt.Errorf("%s: %w", k, blob.ErrNotFound)
	}
	var body []byte
	fromPeers := false
	if localOnly {
		lr, size, err := h.cfg.Cache.OpenLocal(k, 0, -1)
		if err != nil {
			return nil, "", "", err
		}
		defer lr.Close()
		if size > maxManifestBytes {
			return nil, "", "", fmt.Errorf("%s is %d bytes, too big for a manifest: %w", k, size, blob.ErrNotFound)
		}
		if body, err = io.ReadAll(lr); err != nil {
			return nil, "", "", err
		}
	} else {
		hd := h.cfg.Cache.Open(k, h.cfg.Plan.Plan(k, origin))
		defer hd.Close()
		size, err := hd.Size(ctx)
		if err != nil {
			return nil, "", "", err
		}
		if size > maxManifestBytes {
			return nil, "", "", fmt.Errorf("%s is %d bytes, too big for a manifest: %w", k, size, blob.ErrNotFound)
		}
		body = make([]byte, size)
		if n, err := hd.ReadAt(ctx, body, 0); int64(n) != size || (err != nil && err != io.EOF) {
			return nil, "", "", fmt.Errorf("read %s: %d of %d bytes: %v", k, n, size, err)
		}
		fromPeers = hd.Served().Peers > 0
	}
	// Bytes from peers are checked before containerd sees them.
	if sum := sha256.Sum256(body); "sha256:"+hex.EncodeToString(sum[:]) != string(k) {
		return nil, "", "", fmt.Errorf("%s: content does not match its digest: %w", k, blob.ErrNotFound)
	}
	mt, err := manifestMediaType(body, "", k)
	if err == nil && fromPeers && h.cfg.ExpectPeers != nil {
		if ks := manifestRefs(body); len(ks) > 0 {
			h.cfg.ExpectPeers(ks)
		}
	}
	return body, mt, "cache", err
}

// manifestRefs lists the digests a manifest names: its config and layers,
// or an index's manifests (at most maxManifestRefs).
func manifestRefs(body []byte) []blob.Key {
	type desc struct {
		Digest string `json:"digest"`
	}
	var m struct {
		Config    *desc  `json:"config"`
		Layers    []desc `json:"layers"`
		Manifests []desc `json:"manifests"`
	}
	if json.Unmarshal(body, &m) != nil {
		return nil
	}
	all := append(m.Layers, m.Manifests...)
	if m.Config != nil {
		all = append(all, *m.Config)
	}
	var out []blob.Key
	for _, d := range all {
		if k, err := blob.ParseDigest(d.Digest); err == nil && len(out) < maxManifestRefs {
			out = append(out, k)
		}
	}
	return out
}

// maxManifestRefs bounds the digests taken from one manifest.
const maxManifestRefs = 256

func readAllAt(r io.ReaderAt, size int64) ([]byte, error) {
	if size > maxManifestBytes {
		return nil, fmt.Errorf("%d bytes, too big for a manifest: %w", size, blob.ErrNotFound)
	}
	p := make([]byte, size)
	n, err := r.ReadAt(p, 0)
	if int64(n) == size {
		return p, nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return nil, err
}

// manifestMediaType returns the stored media type, else the one the
// manifest names, else the one its shape implies. A blob that is not a
// manifest is not found as one.
func manifestMediaType(body []byte, stored string, k blob.Key) (string, error) {
	var m struct {
		SchemaVersion int               `json:"schemaVersion"`
		MediaType     string            `json:"mediaType"`
		Manifests     []json.RawMessage `json:"manifests"`
		Config        json.RawMessage   `json:"config"`
		Layers        []json.RawMessage `json:"layers"`
		FSLayers      []json.RawMessage `json:"fsLayers"`
	}
	if len(body) == 0 || body[0] != '{' || json.Unmarshal(body, &m) != nil || m.SchemaVersion == 0 {
		return "", fmt.Errorf("%s is not a manifest: %w", k, blob.ErrNotFound)
	}
	switch {
	case stored != "" && (strings.Contains(stored, "manifest") || strings.Contains(stored, "index")):
		return stored, nil
	case m.MediaType != "":
		return m.MediaType, nil
	case m.Manifests != nil:
		return "application/vnd.oci.image.index.v1+json", nil
	case m.Config != nil || m.Layers != nil:
		return "application/vnd.oci.image.manifest.v1+json", nil
	case m.FSLayers != nil:
		return "application/vnd.docker.distribution.manifest.v1+prettyjws", nil
	}
	return "", fmt.Errorf("%s is not a manifest: %w", k, blob.ErrNotFound)
}
