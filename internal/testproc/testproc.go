// Package testproc runs the server processes of the test harnesses (e2e,
// itest, bench): a daemon started with its output in a log file and in its
// own process group, stopped with SIGTERM and then SIGKILL after a bound;
// waits for a port, a socket or a URL that end early when the process dies;
// the last lines of a log for an error message; and a free loopback port.
package testproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Spec describes a process to start.
type Spec struct {
	Name string   // names the process in errors
	Args []string // the program and its arguments
	// Log receives stdout and stderr. It is appended to, so a restarted
	// daemon's log keeps what the earlier run said.
	Log string
	// Truncate empties Log first, for a harness that reuses a work folder
	// from an earlier run.
	Truncate bool
	Env      []string // the environment; nil means this process's
	// TermLeader sends Stop's SIGTERM to the process alone instead of its
	// group, so helpers it started (a FUSE mount's fusermount) are left to
	// its own shutdown; SIGKILL always goes to the group.
	TermLeader bool
}

// Proc is a started process. Its methods are safe on a nil *Proc, so a
// harness can stop whatever it got to start.
type Proc struct {
	Name string
	Log  string

	cmd        *exec.Cmd
	termLeader bool
	done       chan struct{}
	err        error // cmd.Wait's result, set before done closes
}

// Start starts the process. It runs in its own process group, so Stop and
// Kill reach every process it forks, and it gets SIGKILL if this process
// dies without stopping it, so no daemon outlives a crashed test binary.
func Start(s Spec) (*Proc, error) {
	if len(s.Args) == 0 || s.Args[0] == "" {
		return nil, fmt.Errorf("start %s: no program given", s.Name)
	}
	if s.Log == "" {
		return nil, fmt.Errorf("start %s: no log file given", s.Name)
	}
	flags := os.O_CREATE | os.O_WRONLY | os.O_APPEND
	if s.Truncate {
		flags |= os.O_TRUNC
	}
	lf, err := os.OpenFile(s.Log, flags, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", s.Name, err)
	}
	cmd := exec.Command(s.Args[0], s.Args[1:]...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = s.Env
	// Pdeathsig follows the process through `ip netns exec` and nsenter,
	// which exec in place.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", s.Name, err)
	}
	p := &Proc{Name: s.Name, Log: s.Log, cmd: cmd, termLeader: s.TermLeader, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, nil
}

// PID is the process's id, which is also its process group's id.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Done closes when the process has exited and been reaped. A nil *Proc's
// channel never closes.
func (p *Proc) Done() <-chan struct{} {
	if p == nil {
		return nil
	}
	return p.done
}

// Running reports whether the process has not exited yet.
func (p *Proc) Running() bool {
	if p == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Err is how the process ended (cmd.Wait's error); nil while it runs.
func (p *Proc) Err() error {
	if p == nil || p.Running() {
		return nil
	}
	return p.err
}

// Stop sends SIGTERM, waits up to grace for the exit, then SIGKILLs the
// process group and waits for the reap. It reports whether SIGKILL was
// needed; a process that had already exited is left as it is.
func (p *Proc) Stop(grace time.Duration) (killed bool) {
	if !p.Running() {
		return false
	}
	if p.termLeader {
		p.cmd.Process.Signal(syscall.SIGTERM)
	} else {
		syscall.Kill(-p.PID(), syscall.SIGTERM)
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
		return false
	case <-t.C:
	}
	p.Kill()
	return true
}

// Kill SIGKILLs the process group and waits for the reap.
func (p *Proc) Kill() {
	if !p.Running() {
		return
	}
	syscall.Kill(-p.PID(), syscall.SIGKILL)
	<-p.done
}

// Tail is the last n lines of the process's log.
func (p *Proc) Tail(n int) string { return Tail(p.Log, n) }

// ErrExited is what a wait returns when the process it watches exits first.
var ErrExited = errors.New("the process exited")

// Poll calls ready every interval until it returns nil. It gives up when
// ctx ends, or at once when exited closes (pass a Proc's Done; nil never
// closes), with ready's last error in the message.
func Poll(ctx context.Context, every time.Duration, exited <-chan struct{}, ready func(context.Context) error) error {
	t := time.NewTicker(every)
	defer t.Stop()
	var last error
	for {
		err := ready(ctx)
		if err == nil {
			return nil
		}
		// A try cut short by the end of ctx says only that; the one before
		// it says why the wait failed. The deadline is read as well as
		// ctx.Err, as a dial times out on it before ctx's timer fires.
		if last == nil || !over(ctx) {
			last = err
		}
		select {
		case <-exited:
			return fmt.Errorf("%w before it was ready (last: %v)", ErrExited, last)
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-t.C:
		}
	}
}

// over reports whether ctx has ended or reached its deadline.
func over(ctx context.Context) bool {
	dl, ok := ctx.Deadline()
	return ctx.Err() != nil || ok && !time.Now().Before(dl)
}

// pollEvery is how often WaitTCP and WaitUnix try: a local listener comes
// up within milliseconds, and a dial costs next to nothing.
const pollEvery = 50 * time.Millisecond

// WaitTCP waits until addr (host:port) accepts a TCP connection.
func WaitTCP(ctx context.Context, addr string, exited <-chan struct{}) error {
	return Poll(ctx, pollEvery, exited, Dials("tcp", addr))
}

// WaitUnix waits until the unix socket at path accepts a connection.
func WaitUnix(ctx context.Context, path string, exited <-chan struct{}) error {
	return Poll(ctx, pollEvery, exited, Dials("unix", path))
}

// Dials is a Poll condition: a connection to addr on network succeeds (and
// is closed again).
func Dials(network, addr string) func(context.Context) error {
	return func(ctx context.Context) error {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return err
		}
		return c.Close()
	}
}

// HTTPOK is a Poll condition: a GET of url answers 200. A nil client is one
// with a 5 s timeout, so one hung request cannot use up the whole wait.
func HTTPOK(hc *http.Client, url string) func(context.Context) error {
	if hc == nil {
		hc = &http.Client{Timeout: 5 * time.Second}
	}
	return func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		return nil
	}
}

// tailMax bounds what Tail reads from the end of a file: enough for any
// number of log lines an error message shows, and a log of one endless line
// costs no more than this.
const tailMax = 1 << 20

// Tail is the last n lines of the file at path, without its trailing
// newlines, read from the file's end (a daemon's log may be large). An
// unreadable file gives the error in parentheses, as the message it goes
// into still has to say something.
func Tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "(" + err.Error() + ")"
	}
	const block = 64 << 10
	end := st.Size()
	var buf []byte
	for end > 0 && len(buf) < tailMax {
		start := max(end-block, 0)
		chunk := make([]byte, end-start)
		if _, err := f.ReadAt(chunk, start); err != nil && err != io.EOF {
			return "(" + err.Error() + ")"
		}
		buf = append(chunk, buf...)
		end = start
		// n complete lines are in buf once n newlines precede its last line.
		if strings.Count(strings.TrimRight(string(buf), "\n"), "\n") >= n {
			break
		}
	}
	return LastLines(string(buf), n)
}

// LastLines is the last n lines of s, without its trailing newlines.
func LastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

var (
	portsMu sync.Mutex
	given   = map[string]bool{} // ip:port FreePort handed out
	listen  = net.Listen        // a test stands in a kernel that repeats ports
)

// FreePort returns a TCP port free on ip right now and not handed out
// before by this process: the kernel may offer a port it just freed again,
// and a daemon given one port for two of its listeners fails to start.
func FreePort(ip string) (int, error) {
	portsMu.Lock()
	defer portsMu.Unlock()
	for try := 0; ; try++ {
		ln, err := listen("tcp", net.JoinHostPort(ip, "0"))
		if err != nil {
			return 0, fmt.Errorf("free port on %s: %w", ip, err)
		}
		addr := ln.Addr().(*net.TCPAddr)
		ln.Close()
		// After 100 repeats the port space is exhausted of fresh ones:
		// a reused port is better than none.
		if !given[addr.String()] || try == 100 {
			given[addr.String()] = true
			return addr.Port, nil
		}
	}
}
