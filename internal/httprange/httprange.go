// Package httprange parses the byte ranges of HTTP's Range and Content-Range
// headers, for every face that reads them: the HTTP mirror (clients' Range),
// the peer plane (peers' Range and Content-Range) and the origin client
// (origins' Content-Range). One parser keeps the faces from disagreeing on
// what a range means.
package httprange

import (
	"errors"
	"fmt"
	"strings"
)

var (
	// ErrMalformed is a header that is not one well-formed bytes range.
	ErrMalformed = errors.New("malformed range")
	// ErrUnsatisfiable is a well-formed range that selects no byte of the blob.
	ErrUnsatisfiable = errors.New("range not satisfiable")
)

// Spec is one "bytes=" range: First-Last, First- (Last -1), or the last
// Suffix bytes (-Suffix: First and Last -1).
type Spec struct {
	First, Last, Suffix int64
}

// Parse parses a Range header holding one bytes range ("bytes=a-b", "bytes=a-"
// or "bytes=-n"); other units and several ranges are refused.
func Parse(h string) (Spec, error) {
	spec, ok := strings.CutPrefix(strings.TrimSpace(h), "bytes=")
	if !ok {
		return Spec{}, fmt.Errorf("%w %q: only bytes ranges are supported", ErrMalformed, h)
	}
	if strings.Contains(spec, ",") {
		return Spec{}, fmt.Errorf("%w %q: multiple ranges are not supported", ErrMalformed, h)
	}
	a, b, ok := strings.Cut(strings.TrimSpace(spec), "-")
	if !ok {
		return Spec{}, fmt.Errorf("%w %q", ErrMalformed, h)
	}
	a, b = strings.TrimSpace(a), strings.TrimSpace(b)
	switch {
	case a == "":
		last, ok := number(b)
		if !ok {
			return Spec{}, fmt.Errorf("%w %q", ErrMalformed, h)
		}
		return Spec{First: -1, Last: -1, Suffix: last}, nil
	case b == "":
		first, ok := number(a)
		if !ok {
			return Spec{}, fmt.Errorf("%w %q", ErrMalformed, h)
		}
		return Spec{First: first, Last: -1, Suffix: -1}, nil
	}
	first, ok1 := number(a)
	last, ok2 := number(b)
	if !ok1 || !ok2 || last < first {
		return Spec{}, fmt.Errorf("%w %q", ErrMalformed, h)
	}
	return Spec{First: first, Last: last, Suffix: -1}, nil
}

// Resolve places the range in a blob of size bytes: the offset and length of
// the bytes it selects, clamped to the blob, or ErrUnsatisfiable.
func (s Spec) Resolve(size int64) (off, n int64, err error) {
	if s.Suffix >= 0 {
		if s.Suffix == 0 || size == 0 {
			return 0, 0, fmt.Errorf("%w: last %d bytes of %d", ErrUnsatisfiable, s.Suffix, size)
		}
		n = min(s.Suffix, size)
		return size - n, n, nil
	}
	if s.First >= size {
		return 0, 0, fmt.Errorf("%w: from %d of %d bytes", ErrUnsatisfiable, s.First, size)
	}
	end := size - 1
	if s.Last >= 0 {
		end = min(s.Last, end)
	}
	return s.First, end - s.First + 1, nil
}

// Content is one Content-Range: First-Last of Total bytes. First and Last
// are -1 for "bytes */Total"; Total is -1 when the sender does not know it
// ("bytes a-b/*").
type Content struct {
	First, Last, Total int64
}

// ParseContent parses a Content-Range header. The range must lie inside the
// total the header states: an answer that contradicts its own size is not one
// a cache can place.
func ParseContent(h string) (Content, error) {
	spec, ok := strings.CutPrefix(h, "bytes ")
	rng, tot, ok2 := strings.Cut(spec, "/")
	if !ok || !ok2 {
		return Content{}, fmt.Errorf("bad Content-Range %q", h)
	}
	c := Content{First: -1, Last: -1, Total: -1}
	if tot != "*" {
		if c.Total, ok = number(tot); !ok {
			return Content{}, fmt.Errorf("bad Content-Range %q: size", h)
		}
	}
	if rng == "*" {
		if c.Total < 0 {
			return Content{}, fmt.Errorf("bad Content-Range %q: neither range nor size", h)
		}
		return c, nil
	}
	a, b, ok := strings.Cut(rng, "-")
	first, ok1 := number(a)
	last, ok2 := number(b)
	if !ok || !ok1 || !ok2 || last < first || (c.Total >= 0 && last >= c.Total) {
		return Content{}, fmt.Errorf("bad Content-Range %q: range outside the size", h)
	}
	c.First, c.Last = first, last
	return c, nil
}

// number parses a non-negative decimal of ASCII digits alone (no sign, no
// spaces) that fits an int64.
func number(s string) (int64, bool) {
	if s == "" || len(s) > 19 {
		return 0, false
	}
	var v int64
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		d := int64(c - '0')
		if v > (1<<63-1-d)/10 {
			return 0, false
		}
		v = v*10 + d
	}
	return v, true
}
