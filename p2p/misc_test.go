package p2p

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/peerd-project/peerd/blob"
)

func TestKeyToCID(t *testing.T) {
	k := blob.Key("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
	c, err := KeyToCID(k)
	if err != nil {
		t.Fatal(err)
	}
	// The CIDv1 raw sha2-256 of the empty string, as IPFS tools print it.
	if got := c.String(); got != "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku" {
		t.Fatalf("CID %s", got)
	}
	if c.Type() != cid.Raw {
		t.Fatalf("codec %x, want raw", c.Type())
	}
	back, err := CIDToKey(c)
	if err != nil || back != k {
		t.Fatalf("round trip: %s, %v", back, err)
	}
	for _, bad := range []blob.Key{"url:" + blob.Key(strings.Repeat("a", 64)), "sha256:xyz", "sha512:" + blob.Key(strings.Repeat("a", 64))} {
		if _, err := KeyToCID(bad); !errors.Is(err, blob.ErrInvalidKey) {
			t.Errorf("KeyToCID(%q): %v, want ErrInvalidKey", bad, err)
		}
	}
}

func TestIdentityKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	id1, err := PeerIDFromDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v, %v; want 0600", st.Mode().Perm(), err)
	}
	id2, err := PeerIDFromDir(dir)
	if err != nil || id1 != id2 {
		t.Fatalf("second load gave %s (%v), want %s", id2, err, id1)
	}
	os.Chmod(filepath.Join(dir, KeyFile), 0o644)
	if _, err := LoadOrCreateKey(dir); err == nil {
		t.Fatal("a world-readable key was accepted")
	}
	os.WriteFile(filepath.Join(dir, KeyFile), []byte("garbage"), 0o600)
	if _, err := LoadOrCreateKey(dir); err == nil {
		t.Fatal("a corrupt key was accepted")
	}
}

func TestSwarmKey(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	os.WriteFile(good, []byte("/key/swarm/psk/1.0.0/\n/base16/\n"+strings.Repeat("ab", 32)+"\n"), 0o600)
	if psk, err := LoadSwarmKey(good); err != nil || len(psk) != 32 {
		t.Fatalf("%v", err)
	}
	bad := filepath.Join(dir, "bad")
	os.WriteFile(bad, []byte("/key/swarm/psk/1.0.0/\n/base16/\nabcd\n"), 0o600)
	if _, err := LoadSwarmKey(bad); err == nil {
		t.Fatal("short swarm key accepted")
	}
	if _, err := LoadSwarmKey(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("missing swarm key accepted")
	}
}

func TestParseRanges(t *testing.T) {
	for _, c := range []struct {
		h      string
		off, n int64
		ok     bool
	}{
		{"", 0, -1, true}, {"bytes=0-0", 0, 1, true}, {"bytes=5-", 5, -1, true}, {"bytes=10-19", 10, 10, true},
		{"bytes=5-4", 0, 0, false}, {"bytes=-5", 0, 0, false}, {"bytes=0-1,3-4", 0, 0, false}, {"items=0-1", 0, 0, false},
		{"bytes=0-9223372036854775807", 0, 0, false}, // a length past int64
		{"bytes=1-9223372036854775807", 1, math.MaxInt64, true},
	} {
		off, n, err := parsePeerRange(c.h)
		if (err == nil) != c.ok || (c.ok && (off != c.off || n != c.n)) {
			t.Errorf("parsePeerRange(%q) = %d, %d, %v", c.h, off, n, err)
		}
	}
	for _, c := range []struct {
		h            string
		total, start int64
		ok           bool
	}{
		{"bytes 0-9/100", 100, 0, true}, {"bytes 10-19/20", 20, 10, true}, {"bytes */0", 0, 0, true},
		{"bytes 0-9/*", 0, 0, false}, {"0-9/100", 0, 0, false}, {"bytes x-9/100", 0, 0, false},
	} {
		total, start, err := parseContentRange(c.h)
		if (err == nil) != c.ok || (c.ok && (total != c.total || start != c.start)) {
			t.Errorf("parseContentRange(%q) = %d, %d, %v", c.h, total, start, err)
		}
	}
}

func TestDefaultPeerAddr(t *testing.T) {
	for in, want := range map[string]string{
		"/ip4/127.0.0.3/tcp/30001": "127.0.0.3:30002",
		"/ip4/0.0.0.0/tcp/0":       "0.0.0.0:0",
		"/ip6/::1/tcp/4001":        "[::1]:4002",
	} {
		if got, err := DefaultPeerAddr(in); err != nil || got != want {
			t.Errorf("DefaultPeerAddr(%s) = %s, %v; want %s", in, got, err, want)
		}
	}
	if _, err := DefaultPeerAddr("/ip4/1.2.3.4/udp/1"); err == nil {
		t.Error("udp accepted")
	}
}

func TestParseBootstrap(t *testing.T) {
	id := newPeerID(t)
	ais, err := ParseBootstrap([]string{"/ip4/127.0.0.1/tcp/1/p2p/" + id.String(), "/ip4/127.0.0.2/tcp/1/p2p/" + id.String()})
	if err != nil || len(ais) != 1 || len(ais[0].Addrs) != 2 {
		t.Fatalf("%v %v", ais, err)
	}
	if _, err := ParseBootstrap([]string{"/ip4/127.0.0.1/tcp/1"}); err == nil {
		t.Fatal("address without /p2p accepted")
	}
}

// fakeProvide records provides; failing keys fail.
type fakeProvide struct {
	mu    sync.Mutex
	count map[cid.Cid]int
	fail  bool
}

func (f *fakeProvide) provide(ctx context.Context, c cid.Cid) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.count[c]++
	if f.fail {
		return errors.New("no peers")
	}
	return nil
}

func (f *fakeProvide) n(k blob.Key) int {
	c, _ := KeyToCID(k)
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.count[c]
}

func TestAdvertiser(t *testing.T) {
	fp := &fakeProvide{count: map[cid.Cid]int{}}
	now := time.Unix(1000, 0)
	var nowMu sync.Mutex
	m := newMetrics(nil)
	a := newAdvertiser("blob", KeyToCID, time.Hour, provideWorkers, m.provides, m.advertised)
	a.accept = blob.Key.Verifiable
	a.provide = fp.provide
	a.now = func() time.Time { nowMu.Lock(); defer nowMu.Unlock(); return now }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	k1 := blob.Key("sha256:" + strings.Repeat("1", 64))
	k2 := blob.Key("sha256:" + strings.Repeat("2", 64))
	a.add(k1)
	a.add(k1) // twice is once
	a.add(k2)
	a.add(blob.Key("url:" + strings.Repeat("3", 64))) // never advertised
	waitFor(t, "both provided", func() bool { return fp.n(k1) == 1 && fp.n(k2) == 1 })

	// Removed keys are not re-advertised; kept ones are, each interval.
	a.remove(k2)
	nowMu.Lock()
	now = now.Add(time.Hour + time.Second)
	nowMu.Unlock()
	a.kick()
	waitFor(t, "k1 re-provided", func() bool { return fp.n(k1) == 2 })
	time.Sleep(50 * time.Millisecond)
	if fp.n(k2) != 1 {
		t.Fatalf("removed key provided %d times", fp.n(k2))
	}
	a.mu.Lock()
	if len(a.keys) != 1 {
		t.Fatalf("%d keys tracked, want 1", len(a.keys))
	}
	a.mu.Unlock()

	// A failure is retried after a backoff, not at once in a loop.
	fp.mu.Lock()
	fp.fail = true
	fp.mu.Unlock()
	k3 := blob.Key("sha256:" + strings.Repeat("4", 64))
	a.add(k3)
	waitFor(t, "k3 tried", func() bool { return fp.n(k3) == 1 })
	time.Sleep(50 * time.Millisecond)
	if fp.n(k3) != 1 {
		t.Fatalf("failed provide retried %d times without waiting", fp.n(k3))
	}
	fp.mu.Lock()
	fp.fail = false
	fp.mu.Unlock()
	nowMu.Lock()
	now = now.Add(retryMin + time.Millisecond)
	nowMu.Unlock()
	a.kick()
	waitFor(t, "k3 retried", func() bool { return fp.n(k3) == 2 })
}
