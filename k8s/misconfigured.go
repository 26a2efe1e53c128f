package k8s

import (
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// ReasonMisconfigured: a doctor check failed (at most once per check per MisconfiguredEvery).
const ReasonMisconfigured = "P2PMisconfigured"

// MisconfiguredEvery is how often one failing check is reported again: a
// setup problem persists until someone fixes it, and an Event per doctor run
// would bury the Node's other events.
const MisconfiguredEvery = time.Hour

// Misconfigured emits P2PMisconfigured Warnings naming the failing check.
type Misconfigured struct {
	e     *Events
	every time.Duration
	now   func() time.Time

	mu   sync.Mutex
	last map[string]time.Time // check → when it was last reported
}

// NewMisconfigured reports through e; every <= 0 means MisconfiguredEvery.
func NewMisconfigured(e *Events, every time.Duration) *Misconfigured {
	if every <= 0 {
		every = MisconfiguredEvery
	}
	return &Misconfigured{e: e, every: every, now: time.Now, last: map[string]time.Time{}}
}

// Report emits the Event for a failing check unless the same check was
// reported within every; it says whether it emitted.
func (m *Misconfigured) Report(check, saw, fix string) bool {
	if !m.e.Enabled() {
		return false
	}
	m.mu.Lock()
	now := m.now()
	if t, ok := m.last[check]; ok && now.Sub(t) < m.every {
		m.mu.Unlock()
		return false
	}
	m.last[check] = now
	m.mu.Unlock()
	m.e.emit(corev1.EventTypeWarning, ReasonMisconfigured, "%s", truncate("check "+check+" failed: "+saw+"; fix: "+fix, 1024))
	return true
}
