package p2p

import (
	"fmt"

	"github.com/peerd-project/peerd/internal/httprange"
)

// parsePeerRange parses "bytes=a-b" or "bytes=a-" (the only forms peers
// send); no header means the whole blob. n is -1 for "to the end".
func parsePeerRange(h string) (off, n int64, err error) {
	if h == "" {
		return 0, -1, nil
	}
	spec, err := httprange.Parse(h)
	if err != nil || spec.Suffix >= 0 {
		return 0, 0, fmt.Errorf("bad range %q", h)
	}
	if spec.Last < 0 {
		return spec.First, -1, nil
	}
	if n = spec.Last - spec.First + 1; n <= 0 { // a length past int64
		return 0, 0, fmt.Errorf("bad range %q", h)
	}
	return spec.First, n, nil
}

// parseContentRange parses a peer's "bytes a-b/total" (or "bytes */total");
// a peer always states the total.
func parseContentRange(h string) (total, start int64, err error) {
	c, err := httprange.ParseContent(h)
	if err != nil {
		return -1, -1, err
	}
	if c.Total < 0 {
		return -1, -1, fmt.Errorf("bad Content-Range %q: no size", h)
	}
	return c.Total, max(c.First, 0), nil
}
