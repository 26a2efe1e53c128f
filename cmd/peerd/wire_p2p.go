package main

import (
	"context"
	"flag"
)

// p2pConfig holds the flags of the peer network (libp2p host, DHT, peer data plane).
type p2pConfig struct{}

func registerP2PFlags(fs *flag.FlagSet, c *p2pConfig) {}

// startP2P starts the libp2p host and DHT and sets a.peerSources.
func startP2P(ctx context.Context, a *app) error { return nil }
