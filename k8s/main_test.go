package k8s

import (
	"flag"
	"log/slog"
	"os"
	"testing"

	"k8s.io/klog/v2"
)

// TestMain keeps client-go's leader-election chatter out of the test output
// unless -v asks for it.
func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Verbose() {
		klog.SetSlogLogger(slog.New(slog.DiscardHandler))
		slog.SetDefault(slog.New(slog.DiscardHandler))
	}
	os.Exit(m.Run())
}
