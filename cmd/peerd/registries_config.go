package main

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/peerd-project/peerd/regconf"
)

func init() {
	register("registries-config", "write (or --remove) the containers-registries.conf drop-in that makes CRI-O and Podman use this node as a mirror", registriesConfigCmd)
}

func registriesConfigCmd(args []string) error {
	fs := newFlagSet("registries-config", `Write <conf-dir>/`+regconf.FileName+`, a containers-registries.conf (v2) drop-in
that gives each registry peerd as its first mirror, at <mirror>/peerd/<registry>,
so CRI-O, Podman and skopeo try peerd first and the registry after it. What the
operator gave a registry elsewhere (location, insecure, blocked) is carried over;
a registry that already has mirrors elsewhere is refused. Running it again
changes nothing; --remove deletes the drop-in.`)
	var (
		dir        string
		registries registryList
		mirror     string
		remove     bool
	)
	fs.StringVar(&dir, "conf-dir", "/etc/containers/registries.conf.d", "the drop-in folder (registries.conf beside it is read too)")
	fs.Var(&registries, "registries", "registry hosts to mirror, host[:port] as in an image reference; http://host:port for a plain-HTTP registry (repeatable, comma-separated)")
	fs.StringVar(&mirror, "mirror", "http://127.0.0.1:30000", "peerd's HTTP address as the clients reach it")
	fs.BoolVar(&remove, "remove", false, "undo: delete peerd's drop-in")
	if err := parse(fs, args); err != nil {
		return err
	}
	path := filepath.Join(dir, regconf.FileName)
	if remove {
		ok, err := regconf.Remove(dir)
		if err != nil {
			return err
		}
		if ok {
			fmt.Println(path)
		} else {
			fmt.Println("nothing to change")
		}
		return nil
	}
	if len(registries.items) == 0 {
		return errors.New("--registries: name at least one registry")
	}
	changed, err := regconf.Write(regconf.Config{Dir: dir, Registries: registries.items, Mirror: mirror})
	if err != nil {
		return err
	}
	if changed {
		fmt.Println(path)
	} else {
		fmt.Println("nothing to change")
	}
	return nil
}
