package containerd

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/containerd/containerd/v2/client"
)

// DialSocket returns a Connect function for Options that talks gRPC to the
// containerd listening on socket, in namespace ns.
func DialSocket(socket, ns string) func(ctx context.Context) (*Backend, error) {
	return func(ctx context.Context) (*Backend, error) {
		// The gRPC client dials lazily; say plainly when there is nothing to dial.
		if _, err := os.Stat(socket); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("containerd socket %s does not exist", socket)
			}
			return nil, fmt.Errorf("containerd socket %s: %w", socket, err)
		}
		c, err := client.New(socket, client.WithDefaultNamespace(ns), client.WithTimeout(5*time.Second))
		if err != nil {
			return nil, fmt.Errorf("connect to containerd at %s: %w", socket, err)
		}
		return &Backend{
			Content: c.ContentStore(),
			Images:  c.ImageService(),
			Events:  c.EventService(),
			Version: func(ctx context.Context) (string, error) {
				v, err := c.Version(ctx)
				return v.Version, err
			},
			Close: c.Close,
		}, nil
	}
}
