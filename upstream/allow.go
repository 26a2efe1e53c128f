// Package upstream fetches byte ranges from origins (registries, blob
// stores) over HTTP, and decides which origins peerd may contact at all.
package upstream

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
)

// AllowList matches origin hosts against operator-given patterns: "host",
// "host:port", "*.domain" and "*.domain:port". A pattern without a port
// matches any port. Matching is exact and anchored on the URL's host,
// case-insensitive; "*.example.com" matches "a.example.com" and
// "a.b.example.com" but not "example.com" or "badexample.com".
type AllowList struct {
	patterns []pattern
}

type pattern struct {
	host     string // lowercased, without "*." for wildcards
	wildcard bool
	port     string // "" = any
}

// ErrNotAllowed is returned for an origin no pattern admits.
var ErrNotAllowed = errors.New("upstream host not allowed")

// ParseAllowList parses patterns; items may hold several comma-separated ones.
func ParseAllowList(items []string) (*AllowList, error) {
	a := &AllowList{}
	for _, item := range items {
		for _, raw := range strings.Split(item, ",") {
			raw = strings.TrimSpace(raw)
			if raw == "" {
				continue
			}
			p, err := parsePattern(raw)
			if err != nil {
				return nil, err
			}
			a.patterns = append(a.patterns, p)
		}
	}
	return a, nil
}

func parsePattern(raw string) (pattern, error) {
	var p pattern
	s := strings.ToLower(raw)
	if strings.Contains(s, "/") || strings.Contains(s, "@") {
		return p, fmt.Errorf("allow pattern %q: want host, host:port, *.domain or *.domain:port", raw)
	}
	host := s
	if h, port, err := net.SplitHostPort(s); err == nil {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return p, fmt.Errorf("allow pattern %q: bad port", raw)
		}
		host, p.port = h, port
	} else if strings.Count(s, ":") == 1 {
		return p, fmt.Errorf("allow pattern %q: %v", raw, err)
	}
	if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
		if a, err := netip.ParseAddr(host); err != nil || !a.Is6() {
			return p, fmt.Errorf("allow pattern %q: brackets hold an IPv6 address", raw)
		}
	}
	if strings.HasPrefix(host, "*.") {
		p.wildcard = true
		host = host[2:]
	}
	if host == "" || strings.Contains(host, "*") {
		return p, fmt.Errorf("allow pattern %q: a wildcard may only lead as \"*.\"", raw)
	}
	// Check refuses every non-ASCII host, so such a pattern could never match: say so at start.
	for i := 0; i < len(host); i++ {
		if host[i] >= 0x80 {
			return p, fmt.Errorf("allow pattern %q: write an international domain name in its ASCII (xn--) form", raw)
		}
	}
	if _, err := netip.ParseAddr(host); err != nil && !hostName(host) {
		return p, fmt.Errorf("allow pattern %q: want a host name (letters, digits, '-', '_', dots between labels) or an IP address", raw)
	}
	p.host = host
	return p, nil
}

// hostName reports whether h is dot-separated non-empty labels of ASCII
// letters, digits, '-' and '_' (or empty: the caller reports that).
func hostName(h string) bool {
	if h == "" {
		return true
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// Len is the number of patterns.
func (a *AllowList) Len() int { return len(a.patterns) }

// Check reports why u may not be fetched, or nil if it may.
func (a *AllowList) Check(u *url.URL) error {
	// The HTTP client dials a non-ASCII name by its IDNA form, which may
	// differ from what strings.ToLower makes of it ("İ" lowers to "i" but
	// becomes "xn--…"): only ASCII names are compared, so the host checked
	// is the host dialed.
	for i := 0; i < len(u.Hostname()); i++ {
		if u.Hostname()[i] >= 0x80 {
			return fmt.Errorf("%w: non-ASCII host %q (use its xn-- form)", ErrNotAllowed, u.Hostname())
		}
	}
	host := strings.ToLower(u.Hostname())
	// A name with an empty label (".net", "a..net", "a.net.") is no host a
	// pattern names, though a suffix comparison would take ".net" for "*.net".
	if host == "" || strings.HasPrefix(host, ".") || strings.HasSuffix(host, ".") || strings.Contains(host, "..") {
		return fmt.Errorf("%w: %q is not a host name", ErrNotAllowed, Bound(host))
	}
	port := u.Port()
	if port == "" {
		switch strings.ToLower(u.Scheme) {
		case "http":
			port = "80"
		case "https":
			port = "443"
		}
	}
	if ip, err := netip.ParseAddr(host); err == nil && Forbidden(ip) {
		return fmt.Errorf("%w: %s is a link-local or metadata address", ErrNotAllowed, Bound(host))
	}
	for _, p := range a.patterns {
		if p.port != "" && p.port != port {
			continue
		}
		if p.wildcard {
			if strings.HasSuffix(host, "."+p.host) {
				return nil
			}
		} else if host == p.host {
			return nil
		}
	}
	return fmt.Errorf("%w: %s matches no --upstream-allow pattern", ErrNotAllowed, Bound(u.Host))
}

var ec2MetadataV6 = netip.MustParseAddr("fd00:ec2::254")

// Forbidden reports addresses peerd never connects to whatever the
// allow-list says: link-local (169.254.0.0/16, fe80::/10, cloud metadata
// services), the unspecified address and multicast.
func Forbidden(ip netip.Addr) bool {
	ip = ip.Unmap()
	return ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || ip.IsMulticast() ||
		ip.IsUnspecified() || ip == ec2MetadataV6
}
