package httprange

import (
	"errors"
	"testing"
)

func TestParseAndResolve(t *testing.T) {
	const size = 100
	for _, tc := range []struct {
		h       string
		off, n  int64
		bad, no bool // malformed; well-formed but unsatisfiable
	}{
		{h: "bytes=0-9", off: 0, n: 10},
		{h: " bytes= 10 - 19 ", off: 10, n: 10},
		{h: "bytes=90-", off: 90, n: 10},
		{h: "bytes=90-1000", off: 90, n: 10},
		{h: "bytes=-10", off: 90, n: 10},
		{h: "bytes=-1000", off: 0, n: 100},
		{h: "bytes=100-", no: true},
		{h: "bytes=-0", no: true},
		{h: "bytes=5-4", bad: true},
		{h: "bytes=+5-6", bad: true},
		{h: "bytes=0-1,3-4", bad: true},
		{h: "items=0-1", bad: true},
		{h: "bytes=-", bad: true},
		{h: "bytes=99999999999999999999-", bad: true},
	} {
		spec, err := Parse(tc.h)
		if tc.bad {
			if !errors.Is(err, ErrMalformed) {
				t.Errorf("Parse(%q) = %+v, %v; want ErrMalformed", tc.h, spec, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.h, err)
			continue
		}
		off, n, err := spec.Resolve(size)
		if tc.no {
			if !errors.Is(err, ErrUnsatisfiable) {
				t.Errorf("Resolve(%q) = %d, %d, %v; want ErrUnsatisfiable", tc.h, off, n, err)
			}
			continue
		}
		if err != nil || off != tc.off || n != tc.n {
			t.Errorf("Resolve(%q) = %d, %d, %v; want %d, %d", tc.h, off, n, err, tc.off, tc.n)
		}
	}
}

func TestParseContent(t *testing.T) {
	for _, tc := range []struct {
		h    string
		want Content
		bad  bool
	}{
		{h: "bytes 0-9/100", want: Content{0, 9, 100}},
		{h: "bytes 0-9/*", want: Content{0, 9, -1}},
		{h: "bytes */100", want: Content{-1, -1, 100}},
		{h: "bytes */*", bad: true},
		{h: "bytes 100-199/50", bad: true},
		{h: "bytes 5-4/100", bad: true},
		{h: "bytes 7/100", bad: true},
		{h: "bytes -1-5/100", bad: true},
		{h: "0-9/100", bad: true},
	} {
		got, err := ParseContent(tc.h)
		if tc.bad != (err != nil) || (!tc.bad && got != tc.want) {
			t.Errorf("ParseContent(%q) = %+v, %v", tc.h, got, err)
		}
	}
}
