package p2p

import (
	"fmt"
	"strconv"
	"strings"
)

// parsePeerRange parses "bytes=a-b" or "bytes=a-" (the only forms peers
// send); no header means the whole blob.
func parsePeerRange(h string) (off, n int64, err error) {
	if h == "" {
		return 0, -1, nil
	}
	spec, ok := strings.CutPrefix(h, "bytes=")
	a, b, ok2 := strings.Cut(spec, "-")
	if !ok || !ok2 || strings.Contains(spec, ",") {
		return 0, 0, fmt.Errorf("bad range %q", h)
	}
	off, err = strconv.ParseInt(a, 10, 64)
	if err != nil || off < 0 {
		return 0, 0, fmt.Errorf("bad range %q", h)
	}
	if b == "" {
		return off, -1, nil
	}
	end, err := strconv.ParseInt(b, 10, 64)
	if err != nil || end < off || end-off+1 <= 0 { // the last: a length past int64
		return 0, 0, fmt.Errorf("bad range %q", h)
	}
	return off, end - off + 1, nil
}

// parseContentRange parses "bytes a-b/total" (or "bytes */total").
func parseContentRange(h string) (total, start int64, err error) {
	spec, ok := strings.CutPrefix(h, "bytes ")
	rng, tot, ok2 := strings.Cut(spec, "/")
	if !ok || !ok2 {
		return -1, -1, fmt.Errorf("bad Content-Range %q", h)
	}
	total, err = strconv.ParseInt(tot, 10, 64)
	if err != nil || total < 0 {
		return -1, -1, fmt.Errorf("bad Content-Range %q", h)
	}
	if rng == "*" {
		return total, 0, nil
	}
	// The range must lie inside the blob the peer states the size of.
	a, b, ok := strings.Cut(rng, "-")
	start, err = strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	if !ok || err != nil || err2 != nil || start < 0 || end < start || end >= total {
		return -1, -1, fmt.Errorf("bad Content-Range %q", h)
	}
	return total, start, nil
}
