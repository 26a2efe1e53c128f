package cripod

// Reading a container's CRI log file.

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// LogFile is the CRI log file of the latest attempt of container name.
func (p *Pod) LogFile(name string) string {
	attempt := p.attempt[name]
	if attempt > 0 {
		attempt--
	}
	return filepath.Join(p.LogDir, name, fmt.Sprintf("%d.log", attempt))
}

// Logs returns the log lines of the latest attempt of container name, the
// CRI log format stripped.
func (p *Pod) Logs(name string) string {
	return ReadLog(p.LogFile(name))
}

// ReadLog reads a CRI log file ("<time> <stream> <P|F> <line>" lines) as
// the lines the container wrote.
func ReadLog(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	var b strings.Builder
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), " ", 4)
		if len(parts) == 4 {
			b.WriteString(parts[3])
			if parts[2] == "F" {
				b.WriteByte('\n')
			}
		}
	}
	return b.String()
}
