package upstream

import (
	"errors"
	"net/url"
	"strings"
)

// maxEcho bounds any URL, host or origin-supplied text that peerd echoes in
// an error, a response or a log line: the input may be as long as the
// request line allows, and echoing it whole costs the same again.
const maxEcho = 256

// Bound truncates s to a length fit for an error message or a log line.
func Bound(s string) string {
	if len(s) > maxEcho {
		return s[:maxEcho] + "...(truncated)"
	}
	return s
}

// RedactText removes the query string, fragment and userinfo of every
// http(s) URL in s: signed URLs carry their signature there, and error text
// (Go's *url.Error, a bad Location) quotes URLs whole.
func RedactText(s string) string {
	var b strings.Builder
	for {
		i := indexScheme(s)
		if i < 0 {
			b.WriteString(s)
			return b.String()
		}
		b.WriteString(s[:i])
		s = s[i:]
		end := strings.IndexAny(s, " \t\r\n\"'`<>")
		if end < 0 {
			end = len(s)
		}
		b.WriteString(redactURLText(s[:end]))
		s = s[end:]
	}
}

func indexScheme(s string) int {
	l := strings.ToLower(s)
	i, j := strings.Index(l, "http://"), strings.Index(l, "https://")
	if i < 0 || (j >= 0 && j < i) {
		return j
	}
	return i
}

// RedactURL strips userinfo, query and fragment from one URL's text (any
// scheme, parsed or not) and bounds it: the form in which peerd echoes a
// URL a client or an origin gave it.
func RedactURL(u string) string { return Bound(redactURLText(u)) }

func redactURLText(u string) string {
	if q := strings.IndexAny(u, "?#"); q >= 0 {
		u = u[:q]
	}
	scheme, rest, ok := strings.Cut(u, "://")
	if !ok {
		return u
	}
	authority, path := rest, ""
	if k := strings.IndexByte(rest, '/'); k >= 0 {
		authority, path = rest[:k], rest[k:]
	}
	if at := strings.LastIndexByte(authority, '@'); at >= 0 {
		authority = authority[at+1:]
	}
	return scheme + "://" + authority + path
}

// redactedError carries an origin error whose text holds no signature and
// is bounded; errors.Is/As still see the original.
type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

// redactErr is applied to every error the HTTP client returns, at the
// source, so no later path (a response body, a log line) can quote a
// signed URL.
func redactErr(err error) error {
	if err == nil {
		return nil
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		ue.URL = Bound(RedactText(ue.URL))
	}
	return &redactedError{msg: Bound(RedactText(err.Error())), err: err}
}
