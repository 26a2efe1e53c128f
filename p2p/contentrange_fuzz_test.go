package p2p

import (
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/peerd-project/peerd/internal/reliability"
)

// FuzzParsePeerContentRange checks the Content-Range of a peer's answer:
// an accepted one names a range inside the blob it states the size of,
// and what the serving side sends (send) parses back to the same values.
func FuzzParsePeerContentRange(f *testing.F) {
	for _, s := range []string{
		"bytes 0-1048575/4194304", "bytes */0", "bytes */100", "bytes 100-199/50", "bytes 5-4/100",
		"bytes 0-99/*", "bytes 0-100/100", "bytes -1-5/10", "bytes 0-9223372036854775806/9223372036854775807",
		"bytes 0/100", "bytes 7/100", "bytes 0-99/100/100", "", "bytes 0-99/-100",
	} {
		f.Add(s)
	}
	var replayed atomic.Int64
	reliability.RecordFuzz(f, &replayed, "FuzzParsePeerContentRange", "found a peer's Content-Range accepted without an end or outside the size it states; now refused")
	f.Fuzz(func(t *testing.T, h string) {
		replayed.Add(1)
		total, start, err := parseContentRange(h)
		if err != nil {
			return
		}
		rng, _, _ := strings.Cut(strings.TrimPrefix(h, "bytes "), "/")
		if rng == "*" {
			if total < 0 || start != 0 {
				t.Fatalf("parseContentRange(%q) = total %d start %d", h, total, start)
			}
			return
		}
		_, b, _ := strings.Cut(rng, "-")
		end, err := strconv.ParseInt(b, 10, 64)
		if err != nil {
			t.Fatalf("parseContentRange(%q) accepted a range without an end", h)
		}
		if start < 0 || end < start || end >= total {
			t.Fatalf("parseContentRange(%q) = start %d (end %d) total %d: outside the blob", h, start, end, total)
		}
		canon := fmt.Sprintf("bytes %d-%d/%d", start, end, total) // as send formats it
		if t2, s2, err := parseContentRange(canon); err != nil || t2 != total || s2 != start {
			t.Fatalf("round trip %q: %d %d %v", canon, t2, s2, err)
		}
	})
}
