// Command pause is the pod sandbox's process in itest/cri_test.go: it holds
// the pod's namespaces and exits on SIGTERM or SIGINT, like the pause image
// a node would pull (the test never reaches a registry outside).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}
