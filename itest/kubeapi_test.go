package itest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/testenv"
	"github.com/peerd-project/peerd/internal/testproc"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// The Kubernetes tests run a real kube-apiserver (built by tools/k8s/build.sh)
// on a real etcd (Debian's etcd-server), both on 127.0.0.1 in a temp dir.

var (
	k8sToolsOnce sync.Once
	k8sToolsDir  string
	k8sToolsErr  error
)

// k8sTools returns the folder holding kube-apiserver and helm: $PEERD_K8S_TOOLS,
// or what tools/k8s/build.sh prints (instant when already built).
func k8sTools(t testing.TB) string {
	t.Helper()
	k8sToolsOnce.Do(func() {
		if d := os.Getenv("PEERD_K8S_TOOLS"); d != "" {
			k8sToolsDir = d
			return
		}
		cmd := exec.Command("bash", "../tools/k8s/build.sh")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			k8sToolsErr = fmt.Errorf("tools/k8s/build.sh: %v\n%s", err, stderr.String())
			return
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		k8sToolsDir = lines[len(lines)-1]
	})
	if k8sToolsErr != nil {
		t.Fatal(k8sToolsErr)
	}
	for _, b := range []string{"kube-apiserver", "helm"} {
		if _, err := os.Stat(filepath.Join(k8sToolsDir, b)); err != nil {
			t.Fatalf("%s missing from %s: %v", b, k8sToolsDir, err)
		}
	}
	return k8sToolsDir
}

// kubeAPI is a running etcd + kube-apiserver.
type kubeAPI struct {
	URL        string
	dir        string
	adminToken string
	tokens     map[string]string // user name -> token
	Admin      *kubernetes.Clientset
	AdminREST  *rest.Config
}

// Users the API server knows, with their groups. The peerd user carries the
// identity of the chart's ServiceAccount, so the chart's RBAC applies to it.
var kubeUsers = []struct{ name, groups string }{
	{"admin", "system:masters"},
	{"system:serviceaccount:peerd:peerd", "system:serviceaccounts,system:serviceaccounts:peerd"},
	{"system:serviceaccount:peerd:peerd-cleanup", "system:serviceaccounts,system:serviceaccounts:peerd"},
	{"system:serviceaccount:peerd:unbound", "system:serviceaccounts,system:serviceaccounts:peerd"},
}

func startKubeAPI(t testing.TB) *kubeAPI {
	t.Helper()
	etcdBin := testenv.LookPath(t, "etcd", "etcd-server")
	tools := k8sTools(t)
	dir, err := os.MkdirTemp("", "peerd-kubeapi-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	k := &kubeAPI{dir: dir, tokens: map[string]string{}}

	// etcd
	clientPort, peerPort := FreePort(t, "127.0.0.1"), FreePort(t, "127.0.0.1")
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	etcdDone := startProc(t, dir, "etcd", etcdBin,
		"--name=itest", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=itest="+peerURL, "--log-level=warn")
	waitHTTP(t, etcdURL+"/health", nil, etcdDone, 30*time.Second)

	// Static tokens, and a key pair to sign service account tokens with.
	var csv strings.Builder
	for i, u := range kubeUsers {
		tok := randHex(t)
		k.tokens[u.name] = tok
		fmt.Fprintf(&csv, "%s,%s,uid%d,\"%s\"\n", tok, u.name, i, u.groups)
	}
	k.adminToken = k.tokens["admin"]
	writeFile(t, filepath.Join(dir, "tokens.csv"), csv.String())
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	writeFile(t, filepath.Join(dir, "sa.key"), string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})))
	writeFile(t, filepath.Join(dir, "sa.pub"), string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})))

	port := FreePort(t, "127.0.0.1")
	k.URL = fmt.Sprintf("https://127.0.0.1:%d", port)
	apiDone := startProc(t, dir, "kube-apiserver", filepath.Join(tools, "kube-apiserver"),
		"--etcd-servers="+etcdURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--secure-port="+strconv.Itoa(port),
		// A self-signed serving certificate, generated into cert-dir.
		"--cert-dir="+filepath.Join(dir, "certs"),
		"--token-auth-file="+filepath.Join(dir, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file="+filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/24",
		// The chart's DaemonSet runs privileged (FUSE with a Bidirectional mount).
		"--allow-privileged=true",
		// The endpoint reconciler refuses a loopback advertise address; no
		// test needs the kubernetes Service's endpoints.
		"--endpoint-reconciler-type=none",
		"--enable-priority-and-fairness=false",
		"--v=1")
	k.AdminREST = &rest.Config{Host: k.URL, BearerToken: k.adminToken, TLSClientConfig: rest.TLSClientConfig{Insecure: true}, Timeout: 30 * time.Second}
	hc, err := rest.HTTPClientFor(k.AdminREST)
	if err != nil {
		t.Fatal(err)
	}
	waitHTTP(t, k.URL+"/readyz", hc, apiDone, 2*time.Minute)
	k.Admin, err = kubernetes.NewForConfig(k.AdminREST)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Kubeconfig writes a kubeconfig for a user of kubeUsers and returns its path.
func (k *kubeAPI) Kubeconfig(t testing.TB, user string) string {
	t.Helper()
	tok, ok := k.tokens[user]
	if !ok {
		t.Fatalf("no API user %q", user)
	}
	p := filepath.Join(k.dir, strings.NewReplacer(":", "_").Replace(user)+".kubeconfig")
	writeFile(t, p, fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: itest
  cluster:
    server: %s
    insecure-skip-tls-verify: true
users:
- name: %s
  user:
    token: %s
contexts:
- name: itest
  context: {cluster: itest, user: %q}
current-context: itest
`, k.URL, user, tok, user))
	return p
}

// startProc runs a server process for the test's lifetime, its output in
// dir/<name>.log. The channel closes when the process exits.
func startProc(t testing.TB, dir, name, bin string, args ...string) <-chan struct{} {
	t.Helper()
	p, err := testproc.Start(testproc.Spec{Name: name, Args: append([]string{bin}, args...), Log: filepath.Join(dir, name+".log")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Stop(15 * time.Second)
		if t.Failed() {
			t.Logf("--- last lines of %s ---\n%s", name, p.Tail(40))
		}
	})
	return p.Done()
}

func waitHTTP(t testing.TB, url string, hc *http.Client, exited <-chan struct{}, within time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	err := testproc.Poll(ctx, 200*time.Millisecond, exited, testproc.HTTPOK(hc, url))
	switch {
	case errors.Is(err, testproc.ErrExited):
		t.Fatalf("the server behind %s exited (%v)", url, err)
	case err != nil:
		t.Fatalf("%s not healthy within %v: %v", url, within, err)
	}
}

func writeFile(t testing.TB, p, s string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func randHex(t testing.TB) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// until polls cond every 100ms until it holds or within passes.
func until(t testing.TB, within time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(within)
	last := ""
	for {
		ok, state := cond()
		if ok {
			return
		}
		last = state
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s (last: %s)", within, what, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
