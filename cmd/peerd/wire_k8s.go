package main

import (
	"context"
	"flag"
)

// k8sConfig holds the flags of the Kubernetes integration (bootstrap modes, Events).
type k8sConfig struct{}

func registerK8sFlags(fs *flag.FlagSet, c *k8sConfig) {}

// startK8s starts Kubernetes bootstrap and the event recorder.
func startK8s(ctx context.Context, a *app) error { return nil }
