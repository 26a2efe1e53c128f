package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/peerd-project/peerd/blob"
	"github.com/peerd-project/peerd/internal/httprange"
)

// Options configure a Client.
type Options struct {
	DialTimeout           time.Duration // default 5s
	ResponseHeaderTimeout time.Duration // default 15s
	Attempts              int           // tries per range, default 3
	Backoff               time.Duration // first retry delay, doubled each time; default 100ms
	UserAgent             string
	Logger                *slog.Logger
	// Resolver looks origin names up; nil is the system's. The forbidden
	// addresses are refused after the lookup, whatever it returns.
	Resolver *net.Resolver
}

// Client fetches ranges from origins. It is safe for concurrent use and
// keeps connections alive across requests.
type Client struct {
	hc   *http.Client
	opts Options
	log  *slog.Logger
}

// StatusError is an origin's unexpected HTTP answer.
type StatusError struct {
	Code   int
	Status string
	Header http.Header
}

func (e *StatusError) Error() string { return "origin answered " + Bound(RedactText(e.Status)) }

// NewClient builds a client whose dialer refuses forbidden addresses even
// when a name resolves to one.
func NewClient(opts Options) *Client {
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = 5 * time.Second
	}
	if opts.ResponseHeaderTimeout <= 0 {
		opts.ResponseHeaderTimeout = 15 * time.Second
	}
	if opts.Attempts <= 0 {
		opts.Attempts = 3
	}
	if opts.Backoff <= 0 {
		opts.Backoff = 100 * time.Millisecond
	}
	if opts.UserAgent == "" {
		opts.UserAgent = "peerd"
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	d := &net.Dialer{
		Timeout:   opts.DialTimeout,
		KeepAlive: 30 * time.Second,
		Resolver:  opts.Resolver,
		Control: func(network, address string, _ syscall.RawConn) error {
			host, _, err := net.SplitHostPort(address)
			if err != nil {
				return err
			}
			if ip, err := netip.ParseAddr(host); err == nil && Forbidden(ip) {
				return fmt.Errorf("%w: refusing to dial %s", ErrNotAllowed, ip)
			}
			return nil
		},
	}
	tr := &http.Transport{
		Proxy:                 nil, // never route through an environment proxy implicitly
		DialContext:           d.DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   32,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: opts.ResponseHeaderTimeout,
		ExpectContinueTimeout: time.Second,
		DisableCompression:    true, // byte ranges must be of the stored bytes
		// An HTTP/2 connection that went silently dead would stay pooled
		// (a response-header timeout resets one stream, not the
		// connection): ping one that has been quiet, close it unanswered.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 15 * time.Second, PingTimeout: 10 * time.Second, WriteByteTimeout: 30 * time.Second},
	}
	return &Client{
		hc: &http.Client{
			Transport:     tr,
			CheckRedirect: checkRedirect,
		},
		opts: opts,
		log:  opts.Logger.With("component", "upstream"),
	}
}

// maxRedirects bounds a redirect chain (registry → storage needs one or two).
const maxRedirects = 5

// LoopHeader marks a request peerd sends an origin. It travels along every
// redirect, so a chain that leads back to a peerd /blobs/ or /v2/ face (this
// node's or another's) is refused there at once instead of the request
// waiting on the fill it is part of.
const LoopHeader = "X-Peerd-Origin-Fetch"

type allowKey struct{}

// checkRedirect holds every hop to the rules of the first URL: the allow-list
// the source was opened with, the forbidden addresses, no loop, a hop limit;
// and keeps credentials for the host the client named.
func checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= maxRedirects {
		return fmt.Errorf("%w: more than %d redirects", ErrNotAllowed, maxRedirects)
	}
	host := Bound(req.URL.Host)
	if ip, err := netip.ParseAddr(strings.Trim(req.URL.Hostname(), "[]")); err == nil && Forbidden(ip) {
		return fmt.Errorf("%w: redirect to %s", ErrNotAllowed, host)
	}
	if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
		return fmt.Errorf("%w: redirect to a %s URL", ErrNotAllowed, Bound(req.URL.Scheme))
	}
	if a, _ := req.Context().Value(allowKey{}).(*AllowList); a != nil {
		if err := a.Check(req.URL); err != nil {
			return fmt.Errorf("redirect: %w", err)
		}
	}
	for _, v := range via {
		if v.URL.String() == req.URL.String() {
			return fmt.Errorf("%w: redirect loop back to %s", ErrNotAllowed, host)
		}
	}
	// Credentials go to the origin the client named, never to a redirect target on another host.
	if req.URL.Host != via[0].URL.Host {
		req.Header.Del("Authorization")
	}
	return nil
}

// HTTPClient exposes the underlying client for callers (the OCI mirror's
// pull-through) that need plain requests with the same safety rules.
func (c *Client) HTTPClient() *http.Client { return c.hc }

// Source returns a blob.Source reading from u. header holds what the origin
// alone may see (Authorization); it never reaches peers or logs. When allow
// is not nil, every redirect target must pass it too, as u did.
func (c *Client) Source(u *url.URL, header http.Header, allow *AllowList) blob.Source {
	return &origin{c: c, url: u.String(), redacted: Bound(redact(u)), header: header, allow: allow}
}

// Authorizer answers a registry's credential challenge.
type Authorizer interface {
	// Authorization returns the Authorization value for a request to u:
	// with challenge nil, one learned before (empty when none); with the
	// headers of a 401 (WWW-Authenticate), one that answers it.
	Authorization(ctx context.Context, u *url.URL, challenge http.Header) (string, error)
}

// SourceWithAuth is Source whose requests carry auth's Authorization, asked
// again once when the origin answers 401.
func (c *Client) SourceWithAuth(u *url.URL, header http.Header, allow *AllowList, auth Authorizer) blob.Source {
	o := c.Source(u, header, allow).(*origin)
	o.auth, o.u = auth, u
	return o
}

func redact(u *url.URL) string {
	r := *u
	r.RawQuery = ""
	r.User = nil
	return r.String()
}

// An origin is a source the cache fills from (a plan's Origin).
var _ blob.Source = (*origin)(nil)

type origin struct {
	c        *Client
	url      string
	redacted string
	header   http.Header
	allow    *AllowList
	auth     Authorizer // nil: header alone
	u        *url.URL
}

func (o *origin) Name() string   { return "upstream" }
func (o *origin) String() string { return o.redacted }

// Fetch GETs bytes [off, off+n) with retries on transport errors and 5xx.
func (o *origin) Fetch(ctx context.Context, _ blob.Key, off, n int64) (io.ReadCloser, int64, error) {
	var last error
	delay := o.c.opts.Backoff
	for attempt := 1; attempt <= o.c.opts.Attempts; attempt++ {
		rc, size, err := o.fetchOnce(ctx, off, n)
		if err == nil {
			return rc, size, nil
		}
		last = err
		if !retryable(err) || ctx.Err() != nil {
			break
		}
		if attempt < o.c.opts.Attempts {
			o.c.log.Debug("retrying origin fetch", "url", o.redacted, "off", off, "attempt", attempt, "err", err)
			select {
			case <-time.After(delay):
			case <-ctx.Done():
				return nil, -1, fmt.Errorf("fetch %s range %d-%d: %w (after %v)", o.redacted, off, off+n-1, ctx.Err(), last)
			}
			delay *= 2
		}
	}
	return nil, -1, fmt.Errorf("fetch %s range %d-%d: %w", o.redacted, off, off+n-1, last)
}

func retryable(err error) bool {
	var se *StatusError
	if errors.As(err, &se) {
		// 508 is a peerd face refusing a loop: asking again loops again.
		return (se.Code >= 500 && se.Code != http.StatusLoopDetected) || se.Code == http.StatusTooManyRequests
	}
	if errors.Is(err, blob.ErrNotFound) || errors.Is(err, ErrNotAllowed) || errors.Is(err, errBadResponse) {
		return false
	}
	return true
}

var errBadResponse = errors.New("bad origin response")

func (o *origin) fetchOnce(ctx context.Context, off, n int64) (io.ReadCloser, int64, error) {
	if o.auth == nil {
		return o.fetchWith(ctx, off, n, "")
	}
	a, err := o.auth.Authorization(ctx, o.u, nil)
	if err != nil {
		return nil, -1, err
	}
	rc, size, err := o.fetchWith(ctx, off, n, a)
	var se *StatusError
	if !errors.As(err, &se) || se.Code != http.StatusUnauthorized {
		return rc, size, err
	}
	if a, err = o.auth.Authorization(ctx, o.u, se.Header); err != nil {
		return nil, -1, fmt.Errorf("%w: %w", se, err) // still the origin's 401, with why it stands
	}
	return o.fetchWith(ctx, off, n, a)
}

// fetchWith is one GET, with authorization when not empty.
func (o *origin) fetchWith(ctx context.Context, off, n int64, authorization string) (io.ReadCloser, int64, error) {
	if o.allow != nil {
		ctx = context.WithValue(ctx, allowKey{}, o.allow)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, o.url, nil)
	if err != nil {
		return nil, -1, err
	}
	for k, vs := range o.header {
		req.Header[k] = vs
	}
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	req.Header.Set("User-Agent", o.c.opts.UserAgent)
	req.Header.Set(LoopHeader, "1")
	if n > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	}
	resp, err := o.c.hc.Do(req)
	if err != nil {
		return nil, -1, redactErr(err)
	}
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, size, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || start != off {
			resp.Body.Close()
			return nil, -1, fmt.Errorf("%w: Content-Range %q for offset %d", errBadResponse, Bound(resp.Header.Get("Content-Range")), off)
		}
		return limitBody(resp.Body, n), size, nil
	case http.StatusOK:
		// The origin ignored Range: skip to off in the full body.
		size := resp.ContentLength
		if off > 0 {
			if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
				resp.Body.Close()
				return nil, -1, fmt.Errorf("skip to %d in full body: %w", off, redactErr(err))
			}
		}
		return limitBody(resp.Body, n), size, nil
	case http.StatusRequestedRangeNotSatisfiable:
		_, size, _ := parseContentRange(resp.Header.Get("Content-Range"))
		resp.Body.Close()
		if size == 0 {
			return io.NopCloser(strings.NewReader("")), 0, nil
		}
		return nil, -1, fmt.Errorf("%w: 416 for range at %d (size %d)", errBadResponse, off, size)
	case http.StatusNotFound:
		resp.Body.Close()
		return nil, -1, fmt.Errorf("origin: %w (404)", blob.ErrNotFound)
	default:
		io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		return nil, -1, &StatusError{Code: resp.StatusCode, Status: resp.Status, Header: resp.Header}
	}
}

type limitedBody struct {
	io.Reader
	io.Closer
}

func limitBody(rc io.ReadCloser, n int64) io.ReadCloser {
	return limitedBody{Reader: io.LimitReader(rc, n), Closer: rc}
}

// parseContentRange reads an origin's Content-Range: the first byte of the
// range and the blob's size (-1 when the origin does not say).
func parseContentRange(s string) (start, size int64, err error) {
	c, err := httprange.ParseContent(s)
	if err != nil {
		return 0, -1, err
	}
	return max(c.First, 0), c.Total, nil
}
