package upstream

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
