package upstream

import (
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/peerd-project/peerd/internal/reliability"
)

// FuzzParseContentRange checks an accepted Content-Range of an origin's
// answer names a range inside the blob, and that the header the client
// would see for a range it asked for round-trips.
func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{
		"bytes 0-99/100", "bytes 100-199/1000", "bytes */100", "bytes */0", "bytes 0-0/*",
		"bytes 5-4/100", "bytes 100-199/50", "bytes -1-5/10", "bytes +5-9/10", "bytes 0-9223372036854775807/9223372036854775807",
		"bytes 0-99/-1", "bytes=0-99/100", "bytes 0-99", "bytes 0/100", "", "bytes 00-01/02",
	} {
		f.Add(s)
	}
	var replayed atomic.Int64
	reliability.RecordFuzz(f, &replayed, "FuzzParseContentRange", "found 206 answers whose range lies outside the size they state (bytes 100-199/50, 5-4/100); now refused as a bad origin response")
	f.Fuzz(func(t *testing.T, s string) {
		replayed.Add(1)
		start, size, err := parseContentRange(s)
		if err != nil {
			return
		}
		if size < -1 {
			t.Fatalf("parseContentRange(%q): size %d", s, size)
		}
		rng, _, _ := strings.Cut(strings.TrimPrefix(s, "bytes "), "/")
		if rng == "*" {
			return
		}
		_, b, _ := strings.Cut(rng, "-")
		end, err := strconv.ParseInt(b, 10, 64)
		if err != nil {
			t.Fatalf("parseContentRange(%q) accepted a range without an end", s)
		}
		if start < 0 || end < start || size >= 0 && end >= size {
			t.Fatalf("parseContentRange(%q) = start %d (end %d) size %d: outside the blob", s, start, end, size)
		}
		// What a well-behaved origin sends for the same range parses the same.
		canon := fmt.Sprintf("bytes %d-%d/%d", start, end, size)
		if size < 0 {
			canon = fmt.Sprintf("bytes %d-%d/*", start, end)
		}
		if s2, z2, err := parseContentRange(canon); err != nil || s2 != start || z2 != size {
			t.Fatalf("round trip %q: %d %d %v", canon, s2, z2, err)
		}
	})
}
