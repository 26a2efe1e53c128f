package httpmirror

// The mirror location containers-registries.conf clients use.

import (
	"net/http"
	"strings"
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
