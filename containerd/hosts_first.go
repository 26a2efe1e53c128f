package containerd

import (
	"os"
	"strconv"
	"strings"
)

// FirstHost returns the URL of the first [host."..."] table of a hosts.toml:
// the server containerd tries first ("" when the file lists none, so
// containerd goes to the registry itself).
func FirstHost(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(stripComment(line))
		if !strings.HasPrefix(line, "[host.") || !strings.HasSuffix(line, "]") {
			continue
		}
		name := strings.TrimSuffix(strings.TrimPrefix(line, "[host."), "]")
		if u, err := strconv.Unquote(strings.TrimSpace(name)); err == nil {
			return u, nil
		}
		return strings.Trim(strings.TrimSpace(name), `'`), nil
	}
	return "", nil
}
