package upstream

import (
	"net/netip"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/net/idna"

	"github.com/peerd-project/peerd/internal/reliability"
)

// effectivePort is the port a URL is dialed on.
func effectivePort(u *url.URL) string {
	if p := u.Port(); p != "" {
		return p
	}
	switch strings.ToLower(u.Scheme) {
	case "http":
		return "80"
	case "https":
		return "443"
	}
	return ""
}

// simpleAllowed is an independent matcher of host and port against the
// raw pattern list: "host", "host:port", "*.domain", "*.domain:port",
// IPv6 literals in brackets. A pattern it cannot read admits nothing.
func simpleAllowed(patterns, host, port string) bool {
	host = strings.ToLower(host)
	for _, p := range strings.Split(strings.ToLower(patterns), ",") {
		p = strings.TrimSpace(p)
		pport := ""
		if i := strings.LastIndex(p, ":"); i >= 0 && (strings.Count(p, ":") == 1 || strings.HasPrefix(p, "[") && p[i-1] == ']') {
			p, pport = p[:i], p[i+1:]
		}
		p = strings.TrimSuffix(strings.TrimPrefix(p, "["), "]")
		if pport != "" && pport != port && strings.TrimLeft(pport, "0") != port {
			continue
		}
		if d, ok := strings.CutPrefix(p, "*."); ok {
			if d != "" && len(host) > len(d)+1 && host[len(host)-len(d)-1:] == "."+d {
				return true
			}
		} else if p != "" && p == host {
			return true
		}
	}
	return false
}

// forbiddenPrefixes are the addresses no allow-list may open, stated
// independently of Forbidden.
var forbiddenPrefixes = []netip.Prefix{
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("ff00::/8"),
	netip.MustParsePrefix("0.0.0.0/32"),
	netip.MustParsePrefix("::/128"),
	netip.MustParsePrefix("fd00:ec2::254/128"),
}

func forbiddenAddr(host string) bool {
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return false
	}
	ip = ip.Unmap()
	for _, p := range forbiddenPrefixes {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// FuzzAllowList checks that a URL the allow-list admits names a host one
// of the patterns admits (by an independent matcher), both as parsed and
// as the HTTP client will dial it (after it re-parses the URL and maps the
// name to ASCII), and that no pattern admits a link-local or metadata
// address.
func FuzzAllowList(f *testing.F) {
	for _, s := range [][2]string{
		{"registry.example.com", "https://registry.example.com/v2/x/blobs/sha256:00"},
		{"registry.example.com", "https://registry.example.com.evil.net/x"},
		{"registry.example.com", "https://evilregistry.example.com/x"},
		{"*.blob.core.windows.net", "https://acct.blob.core.windows.net/c/b?sig=secret"},
		{"*.blob.core.windows.net", "https://blob.core.windows.net/c/b"},
		{"*.blob.core.windows.net:443", "http://a.blob.core.windows.net/c"},
		{"127.0.0.1:5000", "http://127.0.0.1:5000/v2/"},
		{"127.0.0.1:5000", "http://127.0.0.1:50000/v2/"},
		{"[::1]:8080", "http://[::1]:8080/x"},
		{"::1", "http://[::1]/x"},
		{"169.254.169.254", "http://169.254.169.254/latest/meta-data"},
		{"*.internal", "http://[fe80::1%25eth0]/x"},
		{"fd00:ec2::254", "http://[fd00:ec2::254]/"},
		{"example.com", "http://EXAMPLE.COM./x"},
		{"example.com", "http://user:pw@example.com@evil.net/x"},
		{"example.com", "http://example.com%2F@evil.net/"},
		{"*.example.com", "http://a.ｅｘａｍｐｌｅ.com/"},
		{"*.com", "http://evil\u3002com/"},
		{"a.com,b.com", "https://b.com:443/"},
		{"example.com:0443", "https://example.com/"},
	} {
		f.Add(s[0], s[1])
	}
	var replayed atomic.Int64
	reliability.RecordFuzz(f, &replayed, "FuzzAllowList", "found a non-ASCII host (U+0130) admitted by an ASCII pattern but dialed by its xn-- form elsewhere; non-ASCII hosts now refused (403)")
	f.Fuzz(func(t *testing.T, patterns, raw string) {
		replayed.Add(1)
		a, err := ParseAllowList([]string{patterns})
		if err != nil {
			return
		}
		u, err := url.Parse(raw)
		if err != nil {
			return
		}
		if a.Check(u) != nil {
			return
		}
		host, port := u.Hostname(), effectivePort(u)
		if forbiddenAddr(host) {
			t.Fatalf("allow list %q admits forbidden address %q", patterns, host)
		}
		if !simpleAllowed(patterns, host, port) {
			t.Fatalf("allow list %q admits %q (host %q port %q) no pattern names", patterns, raw, host, port)
		}
		// The client re-parses u.String() and dials the ASCII form of the host.
		again, err := url.Parse(u.String())
		if err != nil {
			return // the request cannot even be built
		}
		if again.Hostname() != host || effectivePort(again) != port {
			t.Fatalf("%q re-parses to host %q port %q, checked %q %q", raw, again.Hostname(), effectivePort(again), host, port)
		}
		ascii, err := idna.Lookup.ToASCII(host)
		if err != nil {
			return // net/http refuses to dial it
		}
		if !simpleAllowed(patterns, ascii, port) && !forbiddenAddr(ascii) {
			t.Fatalf("allow list %q admits %q, which is dialed as %q", patterns, host, ascii)
		}
	})
}
