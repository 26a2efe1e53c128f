package upstream

import (
	"errors"
	"net/url"
	"strings"
	"testing"
)

func TestRedactText(t *testing.T) {
	for in, want := range map[string]string{
		`Get "https://s.example/b/data?X-Amz-Signature=abc&x=1": EOF`:      `Get "https://s.example/b/data": EOF`,
		`failed to parse Location header "http://u:pw@h:1/%zz?sig=1": bad`: `failed to parse Location header "http://h:1/%zz": bad`,
		"HTTPS://H/x#frag and http://a@b/c?d then text":                    "HTTPS://H/x and http://b/c then text",
		"no url here ?sig=1": "no url here ?sig=1",
		"ftp://u:pw@h/x?y":   "ftp://u:pw@h/x?y", // only http(s) in free text
	} {
		if got := RedactText(in); got != want {
			t.Errorf("RedactText(%q) = %q, want %q", in, got, want)
		}
	}
	if got := RedactURL("ftp://u:pw@h/x?y"); got != "ftp://h/x" {
		t.Errorf("RedactURL = %q", got)
	}
	if got := RedactURL(strings.Repeat("a", 1<<20)); len(got) > 300 {
		t.Errorf("RedactURL kept %d bytes", len(got))
	}
	// The error keeps its identity for errors.Is and loses the query in every form.
	inner := &url.Error{Op: "Get", URL: "http://h/x?sig=SECRET", Err: ErrNotAllowed}
	err := redactErr(inner)
	if !errors.Is(err, ErrNotAllowed) || strings.Contains(err.Error(), "SECRET") || strings.Contains(inner.Error(), "SECRET") {
		t.Fatalf("redactErr: %v (inner %v)", err, inner)
	}
}
