package k8s

import (
	"errors"
	"fmt"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ErrNoCluster means there is no Kubernetes API to talk to: the process is
// not in a pod and was given no kubeconfig.
var ErrNoCluster = errors.New("no Kubernetes API (not running in a pod, and no --kubeconfig)")

// NewClient builds a client from kubeconfig, or from the pod's service
// account when kubeconfig is empty. Every request has a deadline.
func NewClient(kubeconfig, userAgent string) (kubernetes.Interface, error) {
	return newClient(kubeconfig, userAgent, 15*time.Second)
}

// NewWatchClient is NewClient for long-lived watches: no deadline on the
// whole request (it would end every watch); each watch asks the server to end
// it and carries its own context deadline, and dialing and TLS keep their
// timeouts.
func NewWatchClient(kubeconfig, userAgent string) (kubernetes.Interface, error) {
	return newClient(kubeconfig, userAgent, 0)
}

func newClient(kubeconfig, userAgent string, timeout time.Duration) (kubernetes.Interface, error) {
	var (
		cfg *rest.Config
		err error
	)
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("load --kubeconfig %s: %w", kubeconfig, err)
		}
	} else {
		cfg, err = rest.InClusterConfig()
		if errors.Is(err, rest.ErrNotInCluster) {
			return nil, ErrNoCluster
		}
		if err != nil {
			return nil, fmt.Errorf("in-cluster Kubernetes config: %w", err)
		}
	}
	cfg.UserAgent = userAgent
	cfg.Timeout = timeout
	// A DaemonSet multiplies every request by the node count: stay gentle.
	cfg.QPS, cfg.Burst = 5, 10
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return c, nil
}
