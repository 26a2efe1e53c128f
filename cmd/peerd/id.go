package main

import (
	"fmt"

	"github.com/peerd-project/peerd/p2p"
)

func init() {
	register("id", "print the node's peer ID (creating its identity key if absent)", func(args []string) error {
		fs := newFlagSet("id", "Print the libp2p peer ID of the node whose data lives in --data-dir, creating the\nidentity key (mode 0600) if it does not exist yet, so bootstrap addresses can be written\nbefore the node first starts.")
		dir := fs.String("data-dir", "/var/lib/peerd", "folder for the content cache and the node's identity")
		if err := parse(fs, args); err != nil {
			return err
		}
		id, err := p2p.PeerIDFromDir(*dir)
		if err != nil {
			return err
		}
		fmt.Println(id.String())
		return nil
	})
}
