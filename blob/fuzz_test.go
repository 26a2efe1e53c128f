package blob

import (
	"net/url"
	"testing"
)

// isDigest is an independent statement of the OCI digest form peerd
// accepts: "sha256:" and 64 lowercase hex characters, nothing else.
func isDigest(s string) bool {
	const prefix = "sha256:"
	if len(s) != len(prefix)+64 || s[:len(prefix)] != prefix {
		return false
	}
	for _, c := range []byte(s[len(prefix):]) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// FuzzParseDigest checks ParseDigest, ParseKey and FromHex accept exactly
// the digest forms they document and that an accepted key round-trips.
func FuzzParseDigest(f *testing.F) {
	for _, s := range []string{
		"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
		"url:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
		"sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
		"sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce",
		"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
		"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n",
		"sha256::e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
		"", ":", "sha256:", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		k, err := ParseDigest(s)
		if (err == nil) != isDigest(s) {
			t.Fatalf("ParseDigest(%q) error %v; want accepted=%v", s, err, isDigest(s))
		}
		if err == nil {
			if k.String() != s || !k.Verifiable() || k.Algorithm() != AlgSHA256 || "sha256:"+k.Hex() != s {
				t.Fatalf("ParseDigest(%q) = %q: parts %q %q", s, k, k.Algorithm(), k.Hex())
			}
			if k2, err := ParseDigest(k.String()); err != nil || k2 != k {
				t.Fatalf("round trip of %q: %q, %v", k, k2, err)
			}
		}

		k, err = ParseKey(s)
		urlForm := len(s) == 68 && s[:4] == "url:" && isDigest("sha256:"+s[4:])
		if (err == nil) != (isDigest(s) || urlForm) {
			t.Fatalf("ParseKey(%q) error %v", s, err)
		}
		if err == nil && (k.String() != s || k.Verifiable() != isDigest(s)) {
			t.Fatalf("ParseKey(%q) = %q, verifiable %v", s, k, k.Verifiable())
		}

		k, err = FromHex(s)
		if (err == nil) != isDigest("sha256:"+s) {
			t.Fatalf("FromHex(%q) error %v", s, err)
		}
		if err == nil && k.Hex() != s {
			t.Fatalf("FromHex(%q) = %q", s, k)
		}
	})
}

// FuzzFromURL checks a URL key is always a valid, unverifiable key that
// ignores the query (which carries signatures).
func FuzzFromURL(f *testing.F) {
	f.Add("https://example.com/a/b?sig=x")
	f.Add("http://EXAMPLE.com:8080/%2e%2e/x")
	f.Fuzz(func(t *testing.T, raw string) {
		u, err := url.Parse(raw)
		if err != nil {
			return
		}
		k := FromURL(u)
		if _, err := ParseKey(string(k)); err != nil || k.Verifiable() {
			t.Fatalf("FromURL(%q) = %q: %v", raw, k, err)
		}
		v := *u
		v.RawQuery = "other=1"
		if FromURL(&v) != k {
			t.Fatalf("the query changed the key of %q", raw)
		}
	})
}
