package web

import (
	"fmt"
	"regexp"
	"strings"
	"time"
)

// Size is n bytes for a person: "0 B", "512 B", "1.5 KiB", "20 GiB"; "?" for
// a negative (unknown) size.
func Size(n int64) string {
	if n < 0 {
		return "?"
	}
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	v := float64(n) / 1024
	i := 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if v >= 100 {
		return fmt.Sprintf("%.0f %s", v, units[i])
	}
	s := fmt.Sprintf("%.1f", v)
	s = strings.TrimSuffix(s, ".0")
	return s + " " + units[i]
}

// Duration is d for a person, two units at most: "850ms", "1.2s", "3m12s",
// "5h4m", "2d3h"; "-" for zero.
func Duration(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < 0:
		return "-" + Duration(-d)
	case d < time.Millisecond:
		return fmt.Sprintf("%dµs", d/time.Microsecond)
	case d < time.Second:
		return fmt.Sprintf("%dms", d/time.Millisecond)
	case d < 10*time.Second:
		return strings.TrimSuffix(fmt.Sprintf("%.1f", d.Seconds()), ".0") + "s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", d/time.Second)
	case d < time.Hour:
		return fmt.Sprintf("%dm%ds", d/time.Minute, d%time.Minute/time.Second)
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh%dm", d/time.Hour, d%time.Hour/time.Minute)
	default:
		return fmt.Sprintf("%dd%dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
	}
}

// Speed is n bytes in d for a person: "85 MiB/s"; "-" when d is zero.
func Speed(n int64, d time.Duration) string {
	if d <= 0 || n < 0 {
		return "-"
	}
	return Size(int64(float64(n)/d.Seconds())) + "/s"
}

// Ago is how long before now t was: "12s ago"; "-" for the zero time.
func Ago(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := now.Sub(t).Truncate(time.Second)
	if d < time.Second {
		return "now"
	}
	return Duration(d) + " ago"
}

// Short cuts a long identifier to its head and tail, "12D3Ko…x7Qa", for
// tables; the full value goes into a title attribute.
func Short(s string, n int) string {
	r := []rune(s)
	if n < 5 || len(r) <= n {
		return s
	}
	head := (n - 1) * 2 / 3
	tail := n - 1 - head
	return string(r[:head]) + "…" + string(r[len(r)-tail:])
}

// Redact cuts a URL's query string and fragment, which may hold a signature,
// and any userinfo; the provider redacts already, this is the page's own
// guard.
func Redact(s string) string {
	if i := strings.IndexAny(s, "?#"); i >= 0 {
		s = s[:i]
	}
	if i := strings.Index(s, "://"); i >= 0 {
		rest := s[i+3:]
		end := strings.IndexByte(rest, '/')
		if end < 0 {
			end = len(rest)
		}
		if at := strings.LastIndexByte(rest[:end], '@'); at >= 0 {
			s = s[:i+3] + rest[at+1:]
		}
	}
	return s
}

// urlInText finds URLs with a query string or fragment inside free text.
var urlInText = regexp.MustCompile(`([a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#"'<>]*)[?#][^\s"'<>]*`)

// RedactText cuts the query string and fragment of every URL inside s, an
// error message or a finding, where a signed URL may have slipped in.
func RedactText(s string) string {
	if !strings.Contains(s, "://") {
		return s
	}
	return urlInText.ReplaceAllStringFunc(s, func(u string) string { return Redact(u) + "?…" })
}
