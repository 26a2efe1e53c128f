package upstream

import (
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"
)

// A redirect to a link-local or metadata address is refused by the redirect
// check itself, before the client dials, also for a source opened without an
// allow-list (the registry pull-through). The dialer's guard behind it is a
// second line, not the only one. No connection is made: the dialer refuses
// these addresses too, before connect.
func TestRedirectToForbiddenAddressRefusedAtTheRedirect(t *testing.T) {
	targets := map[string]string{
		"/v4":  "http://169.254.169.254/latest/meta-data/",
		"/v6":  "http://[fe80::1]/x",
		"/ec2": "http://[fd00:ec2::254]/latest",
	}
	origin := serveOn(t, "127.0.0.1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if to, ok := targets[r.URL.Path]; ok {
			http.Redirect(w, r, to, http.StatusFound)
			return
		}
		http.NotFound(w, r)
	}))
	c := NewClient(Options{DialTimeout: time.Second, Attempts: 1})
	for p, to := range targets {
		_, _, err := fetchAll(t, c.Source(mustURL(origin+p), nil, nil), 0, 1)
		if !errors.Is(err, ErrNotAllowed) {
			t.Errorf("redirect to %s: %v, want ErrNotAllowed", to, err)
			continue
		}
		if !strings.Contains(err.Error(), "redirect to") {
			t.Errorf("redirect to %s refused by %v: want the redirect check to refuse it, not only the dialer", to, err)
		}
	}
}
