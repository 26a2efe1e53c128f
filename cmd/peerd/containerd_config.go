package main

import (
	"errors"
	"fmt"
	"time"

	ctrd "github.com/peerd-project/peerd/containerd"
)

func init() {
	register("containerd-config", "write (or --remove) containerd hosts.toml files that use this node as a registry mirror", containerdConfigCmd)
}

func containerdConfigCmd(args []string) error {
	fs := newFlagSet("containerd-config", `Write <hosts-dir>/<registry>/hosts.toml for each registry so that containerd
tries peerd first (capabilities pull and resolve, a short dial timeout) and the
registry after it. Hosts, certificates and settings an existing file holds are
kept; the original is backed up (hosts.toml`+ctrd.BackupSuffix+`) and
--remove restores it. Running it again changes nothing.

containerd reads these files only when its registry config_path names the
folder (containerd 2.x defaults to /etc/containerd/certs.d; 1.x has no default).`)
	var (
		dir        string
		registries registryList
		mirror     string
		dial       time.Duration
		remove     bool
	)
	fs.StringVar(&dir, "hosts-dir", "/etc/containerd/certs.d", "containerd's hosts folder (its registry config_path)")
	fs.Var(&registries, "registries", "registry hosts to mirror, host[:port] as in an image reference: docker.io, ghcr.io, 10.0.0.5:5000, [fd00::1]:5000; http://host:port for a plain-HTTP registry; _default for all others (repeatable, comma-separated)")
	fs.StringVar(&mirror, "mirror", "http://127.0.0.1:30000", "peerd's HTTP address as containerd reaches it")
	fs.DurationVar(&dial, "dial-timeout", ctrd.DefaultDialTimeout, "how long containerd waits to connect to peerd before it moves on to the registry")
	fs.BoolVar(&remove, "remove", false, "undo: restore the original files (or delete the ones peerd created)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if len(registries.items) == 0 {
		return errors.New("--registries: name at least one registry")
	}
	if dial <= 0 || dial > time.Minute {
		return fmt.Errorf("--dial-timeout %v: want more than 0 and at most 1m", dial)
	}
	var changed []string
	var err error
	if remove {
		changed, err = ctrd.RemoveHosts(dir, registries.items)
	} else {
		changed, err = ctrd.WriteHosts(ctrd.HostsConfig{Dir: dir, Registries: registries.items, Mirror: mirror, DialTimeout: dial})
	}
	for _, p := range changed {
		fmt.Println(p)
	}
	if err != nil {
		return err
	}
	if len(changed) == 0 {
		fmt.Println("nothing to change")
	}
	return nil
}
