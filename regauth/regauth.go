// Package regauth holds registry credentials from a Docker-style config
// file (config.json: "auths" by registry) and answers registries' 401
// challenges with them: Basic, or a Bearer token fetched from the realm the
// challenge names and kept until it expires. Credentials for a registry are
// sent to that registry and its token service only; nothing here logs them.
package regauth

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/peerd-project/peerd/upstream"
)

// maxConfigBytes bounds the config file; maxTokenBytes a token answer.
const (
	maxConfigBytes = 1 << 20
	maxTokenBytes  = 64 << 10
	maxTokens      = 4096
	// tokenSlack: a token is renewed this long before it expires.
	tokenSlack = 10 * time.Second
)

// ErrNoCredentials: the registry asks for credentials the file lacks.
var ErrNoCredentials = errors.New("no credentials for this registry in --registry-auth-file")

type cred struct {
	user, pass string
	token      string // a registry token sent as Bearer as it is
}

// Keychain answers challenges for the registries of a config file.
type Keychain struct {
	creds map[string]cred // by host[:port]
	hc    *http.Client
	now   func() time.Time

	mu     sync.Mutex
	tokens map[string]token // by host + "\x00" + repository
}

type token struct {
	value   string // the whole Authorization value
	expires time.Time
}

var _ upstream.Authorizer = (*Keychain)(nil)

// Load reads a Docker-style config file. hc makes the token requests (the
// origin client's, with its address rules).
func Load(path string, hc *http.Client) (*Keychain, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxConfigBytes+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxConfigBytes {
		return nil, fmt.Errorf("%s: over %d bytes", path, maxConfigBytes)
	}
	k, err := Parse(b, hc)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// Parse reads a config file's content.
func Parse(b []byte, hc *http.Client) (*Keychain, error) {
	var cfg struct {
		Auths map[string]struct {
			Auth          string `json:"auth"`
			Username      string `json:"username"`
			Password      string `json:"password"`
			RegistryToken string `json:"registrytoken"`
		} `json:"auths"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("not a registry config (JSON with \"auths\"): %v", err)
	}
	k := &Keychain{creds: map[string]cred{}, hc: hc, now: time.Now, tokens: map[string]token{}}
	for name, a := range cfg.Auths {
		host := hostOf(name)
		if host == "" {
			continue
		}
		c := cred{user: a.Username, pass: a.Password, token: a.RegistryToken}
		if a.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return nil, fmt.Errorf("auths[%q].auth is not base64", host)
			}
			user, pass, ok := strings.Cut(string(raw), ":")
			if !ok {
				return nil, fmt.Errorf("auths[%q].auth is not user:password", host)
			}
			c.user, c.pass = user, pass
		}
		if c.user == "" && c.token == "" {
			continue
		}
		k.creds[host] = c
	}
	return k, nil
}

// hostOf turns a config key ("ghcr.io", "https://ghcr.io", Docker Hub's
// "https://index.docker.io/v1/") into the registry host the mirror names.
func hostOf(key string) string {
	s := key
	if i := strings.Index(s, "://"); i >= 0 {
		s = s[i+3:]
	}
	s, _, _ = strings.Cut(s, "/")
	s = strings.ToLower(s)
	switch s {
	case "index.docker.io", "registry-1.docker.io":
		return "docker.io"
	}
	return s
}

// Registries lists the hosts the keychain has credentials for.
func (k *Keychain) Registries() []string {
	var out []string
	for h := range k.creds {
		out = append(out, h)
	}
	return out
}

// credFor finds the credentials for u's host ("registry-1.docker.io" is
// docker.io's).
func (k *Keychain) credFor(u *url.URL) (cred, bool) {
	c, ok := k.creds[hostOf(u.Host)]
	return c, ok
}

// repoOf is the repository a /v2/<repo>/(manifests|blobs|tags)/… URL names.
func repoOf(u *url.URL) string {
	p := strings.TrimPrefix(u.Path, "/v2/")
	for _, kind := range []string{"/manifests/", "/blobs/", "/tags/"} {
		if i := strings.LastIndex(p, kind); i > 0 {
			return p[:i]
		}
	}
	return ""
}

// Authorization implements upstream.Authorizer.
func (k *Keychain) Authorization(ctx context.Context, u *url.URL, challenge http.Header) (string, error) {
	key := hostOf(u.Host) + "\x00" + repoOf(u)
	if challenge == nil {
		k.mu.Lock()
		t, ok := k.tokens[key]
		k.mu.Unlock()
		if ok && k.now().Before(t.expires) {
			return t.value, nil
		}
		return "", nil
	}
	c, have := k.credFor(u)
	scheme, params := parseChallenge(challenge.Values("Www-Authenticate"))
	var t token
	switch scheme {
	case "basic":
		if !have || c.user == "" {
			return "", ErrNoCredentials
		}
		t = token{value: "Basic " + base64.StdEncoding.EncodeToString([]byte(c.user+":"+c.pass)), expires: k.now().Add(time.Hour)}
	case "bearer":
		if have && c.token != "" {
			t = token{value: "Bearer " + c.token, expires: k.now().Add(time.Hour)}
			break
		}
		var err error
		if t, err = k.fetchToken(ctx, params, c, have); err != nil {
			return "", err
		}
	default:
		return "", fmt.Errorf("the registry asks for credentials in a way peerd does not speak (%q)", scheme)
	}
	k.mu.Lock()
	if len(k.tokens) >= maxTokens {
		k.tokens = map[string]token{}
	}
	k.tokens[key] = t
	k.mu.Unlock()
	return t.value, nil
}

// fetchToken asks the challenge's realm for a token, with the registry's
// credentials when the file has them (anonymous otherwise: public
// repositories of registries like Docker Hub want a token too).
func (k *Keychain) fetchToken(ctx context.Context, params map[string]string, c cred, have bool) (token, error) {
	realm, err := url.Parse(params["realm"])
	if err != nil || (realm.Scheme != "https" && realm.Scheme != "http") || realm.Host == "" {
		return token{}, errors.New("the registry's challenge names no usable token realm")
	}
	q := realm.Query()
	if s := params["service"]; s != "" {
		q.Set("service", s)
	}
	if s := params["scope"]; s != "" {
		q.Set("scope", s)
	}
	realm.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, realm.String(), nil)
	if err != nil {
		return token{}, err
	}
	if have && c.user != "" {
		req.SetBasicAuth(c.user, c.pass)
	}
	req.Header.Set(upstream.LoopHeader, "1")
	resp, err := k.hc.Do(req)
	if err != nil {
		return token{}, fmt.Errorf("token service %s: %s", realm.Host, upstream.RedactText(err.Error()))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		if (resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden) && !have {
			return token{}, ErrNoCredentials
		}
		return token{}, fmt.Errorf("token service %s answered %s", realm.Host, resp.Status)
	}
	var body struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
		ExpiresIn   int    `json:"expires_in"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxTokenBytes)).Decode(&body); err != nil {
		return token{}, fmt.Errorf("token service %s: an answer that is not a token", realm.Host)
	}
	v := body.Token
	if v == "" {
		v = body.AccessToken
	}
	if v == "" {
		return token{}, fmt.Errorf("token service %s: an answer without a token", realm.Host)
	}
	life := time.Duration(body.ExpiresIn) * time.Second
	if life <= 0 {
		life = 60 * time.Second // the distribution spec's default
	}
	return token{value: "Bearer " + v, expires: k.now().Add(max(life-tokenSlack, time.Second))}, nil
}

// parseChallenge reads the first WWW-Authenticate challenge: its scheme
// (lower case) and parameters.
func parseChallenge(vs []string) (string, map[string]string) {
	params := map[string]string{}
	if len(vs) == 0 {
		return "", params
	}
	v := strings.TrimSpace(vs[0])
	scheme, rest, _ := strings.Cut(v, " ")
	for rest = strings.TrimSpace(rest); rest != ""; {
		name, after, ok := strings.Cut(rest, "=")
		if !ok {
			break
		}
		name = strings.ToLower(strings.TrimSpace(name))
		var val string
		if strings.HasPrefix(after, `"`) {
			end := strings.Index(after[1:], `"`)
			if end < 0 {
				break
			}
			val, rest = after[1:1+end], after[2+end:]
		} else {
			val, rest, _ = strings.Cut(after, ",")
		}
		params[name] = val
		rest = strings.TrimLeft(rest, ", ")
	}
	return strings.ToLower(scheme), params
}
