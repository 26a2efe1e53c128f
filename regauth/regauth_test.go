package regauth

import (
	"context"
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

func TestParseConfig(t *testing.T) {
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	k, err := Parse([]byte(`{"auths":{
		"https://index.docker.io/v1/": {"auth": "`+b64("hubuser:hub:pass")+`"},
		"ghcr.io": {"username": "gh", "password": "tok"},
		"http://10.0.0.5:5000": {"registrytoken": "rt"},
		"quay.io": {}
	}}`), http.DefaultClient)
	if err != nil {
		t.Fatal(err)
	}
	for host, want := range map[string]cred{
		"docker.io":     {user: "hubuser", pass: "hub:pass"},
		"ghcr.io":       {user: "gh", pass: "tok"},
		"10.0.0.5:5000": {token: "rt"},
	} {
		if got := k.creds[host]; got != want {
			t.Errorf("%s: %+v, want %+v", host, got, want)
		}
	}
	if _, ok := k.creds["quay.io"]; ok {
		t.Error("an entry without credentials was kept")
	}
	for _, bad := range []string{`{`, `{"auths":{"x":{"auth":"%%%"}}}`, `{"auths":{"x":{"auth":"` + b64("nocolon") + `"}}}`} {
		if _, err := Parse([]byte(bad), nil); err == nil {
			t.Errorf("%s parsed", bad)
		} else if strings.Contains(err.Error(), "nocolon") {
			t.Errorf("the error repeats the secret: %v", err)
		}
	}
}

func TestParseChallenge(t *testing.T) {
	s, p := parseChallenge([]string{`Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"`})
	if s != "bearer" || p["realm"] != "https://auth.example/token" || p["service"] != "registry.example" || p["scope"] != "repository:a/b:pull,push" {
		t.Fatalf("%s %v", s, p)
	}
	if s, p := parseChallenge([]string{`Basic realm=peerd`}); s != "basic" || p["realm"] != "peerd" {
		t.Fatalf("%s %v", s, p)
	}
	if s, _ := parseChallenge(nil); s != "" {
		t.Fatalf("no challenge: %q", s)
	}
}

func TestBasicChallengeWithoutCredentials(t *testing.T) {
	k, _ := Parse([]byte(`{"auths":{"ghcr.io":{"username":"a","password":"b"}}}`), http.DefaultClient)
	u, _ := url.Parse("http://10.0.0.5:5000/v2/m/blobs/sha256:00")
	_, err := k.Authorization(context.Background(), u, http.Header{"Www-Authenticate": {`Basic realm="x"`}})
	if !errors.Is(err, ErrNoCredentials) {
		t.Fatalf("a registry the file does not name: %v", err)
	}
	u, _ = url.Parse("https://ghcr.io/v2/m/blobs/sha256:00")
	a, err := k.Authorization(context.Background(), u, http.Header{"Www-Authenticate": {`Basic realm="x"`}})
	if err != nil || a != "Basic "+base64.StdEncoding.EncodeToString([]byte("a:b")) {
		t.Fatalf("%q %v", a, err)
	}
	// Learned: the next request carries it from the start.
	if a2, _ := k.Authorization(context.Background(), u, nil); a2 != a {
		t.Fatalf("not remembered: %q", a2)
	}
}
