package main

import (
	"context"
	"flag"
)

// fuseConfig holds the flags of the FUSE mount.
type fuseConfig struct{}

func registerFUSEFlags(fs *flag.FlagSet, c *fuseConfig) {}

// startFUSE mounts the blob filesystem.
func startFUSE(ctx context.Context, a *app) error { return nil }
