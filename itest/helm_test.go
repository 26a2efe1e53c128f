package itest

import (
	"bufio"
	"bytes"
	"context"
	stdjson "encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peerd-project/peerd/cache"
	"github.com/peerd-project/peerd/httpmirror"
	"github.com/peerd-project/peerd/k8s"
	"github.com/peerd-project/peerd/p2p"
	"github.com/prometheus/client_golang/prometheus"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/restmapper"
)

const chartDir = "../deploy/helm/peerd"

// helm runs the real helm binary with a throwaway home.
func helm(t testing.TB, args ...string) (string, error) {
	t.Helper()
	home := t.TempDir()
	cmd := exec.Command(filepath.Join(k8sTools(t), "helm"), args...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home, "HELM_CONFIG_HOME="+home, "HELM_DATA_HOME="+home, "KUBECONFIG=/nonexistent")
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("helm %s: %v\n%s%s", strings.Join(args, " "), err, stderr.String(), out.String())
	}
	return out.String(), nil
}

// rendered is one object of `helm template`.
type rendered struct {
	source string // "# Source:" comment
	raw    []byte
	obj    runtime.Object // typed when the kind is in client-go's scheme, else *unstructured.Unstructured
	u      *unstructured.Unstructured
}

// renderChart runs `helm template` and strictly decodes every object.
func renderChart(t testing.TB, valuesYAML string, extra ...string) []rendered {
	t.Helper()
	args := []string{"template", "peerd", chartDir, "--namespace", "peerd"}
	if valuesYAML != "" {
		vf := filepath.Join(t.TempDir(), "values.yaml")
		writeFile(t, vf, valuesYAML)
		args = append(args, "--values", vf)
	}
	out, err := helm(t, append(args, extra...)...)
	if err != nil {
		t.Fatal(err)
	}
	strict := json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme.Scheme, scheme.Scheme, json.SerializerOptions{Yaml: true, Strict: true})
	var objs []rendered
	r := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(out)))
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("split helm output: %v", err)
		}
		src := ""
		for _, line := range strings.Split(string(doc), "\n") {
			if s, ok := strings.CutPrefix(line, "# Source: "); ok {
				src = s
			}
		}
		u := &unstructured.Unstructured{}
		if err := utilyaml.Unmarshal(doc, &u.Object); err != nil {
			t.Fatalf("%s: not YAML: %v", src, err)
		}
		if len(u.Object) == 0 {
			continue // an empty document (a template that rendered nothing)
		}
		if u.GetAPIVersion() == "" || u.GetKind() == "" || u.GetName() == "" {
			t.Fatalf("%s: object without apiVersion, kind or name:\n%s", src, doc)
		}
		ro := rendered{source: src, raw: doc, u: u}
		gvk := u.GroupVersionKind()
		if scheme.Scheme.Recognizes(gvk) {
			// Strict: an unknown or duplicated field is an error, not silence.
			obj, _, err := strict.Decode(doc, nil, nil)
			if err != nil {
				t.Fatalf("%s: %s %s does not decode strictly: %v\n%s", src, gvk.Kind, u.GetName(), err, doc)
			}
			ro.obj = obj
		} else {
			ro.obj = u
		}
		objs = append(objs, ro)
	}
	if len(objs) == 0 {
		t.Fatal("helm template rendered nothing")
	}
	return objs
}

func kinds(objs []rendered) map[string]int {
	m := map[string]int{}
	for _, o := range objs {
		m[o.u.GetKind()]++
	}
	return m
}

func find(t testing.TB, objs []rendered, kind, name string) rendered {
	t.Helper()
	for _, o := range objs {
		if o.u.GetKind() == kind && o.u.GetName() == name {
			return o
		}
	}
	t.Fatalf("no %s %s rendered (have %v)", kind, name, kinds(objs))
	return rendered{}
}

// Value sets the chart must render; each is linted, rendered, strictly
// decoded and dry-run against the API server.
var chartValueSets = map[string]string{
	"default": "",
	"dns-private-no-mount-monitoring": `
bootstrap: {mode: dns, clusterDomain: example.internal}
p2p:
  port: 4001
  peerPort: 4002
  resolveTimeout: 50ms
  swarmKey: {existingSecret: peerd-swarm, secretKey: key}
mount: {enabled: false}
http: {bindAddress: 0.0.0.0, port: 5000}
cache: {size: 100GiB, chunkSize: 4MiB, hostPath: /mnt/peerd}
prefetch: {enabled: true, workers: 8}
upstreamAllow: ["*.blob.core.windows.net", "registry.example:5000"]
registries: [docker.io, _default]
containerd: {configureMirror: false}
monitoring:
  serviceMonitor: {enabled: true, labels: {release: prom}}
  podMonitor: {enabled: true}
grafanaDashboard: {enabled: true}
resources: {requests: {cpu: 50m, memory: 64Mi}}
priorityClassName: ""
image: {digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}
`,
	"static": `
bootstrap:
  mode: static
  static: [/ip4/10.0.0.1/tcp/30001/p2p/12D3KooWKnDdG3iXw9eTFijk3EWSunZcFi54Zka4wmtqtt6rPxc8]
rbac: {create: false}
serviceAccount: {create: false, name: peerd-existing}
p2p: {listenAddress: "/ip6/::/tcp/30001"}
log: {level: debug, format: text}
nodeSelector: {peerd: "yes"}
tolerations: []
`,
}

func TestHelmChart(t *testing.T) {
	api := startKubeAPI(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := api.Admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "peerd"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(api.AdminREST)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(api.Admin.Discovery()))

	if out, err := helm(t, "lint", "--strict", chartDir); err != nil {
		t.Fatalf("helm lint: %v", err)
	} else {
		t.Logf("helm lint: %s", strings.TrimSpace(out))
	}
	// helm itself against the API server: it renders with the server's
	// version and capabilities, dry-runs every object there, and renders NOTES.
	out, err := helm(t, "install", "peerd", chartDir, "--namespace", "peerd", "--dry-run=server",
		"--kubeconfig", api.Kubeconfig(t, "admin"))
	if err != nil {
		t.Fatalf("helm install --dry-run=server: %v", err)
	}
	if !strings.Contains(out, "NOTES:") || !strings.Contains(out, "rollout status daemonset/peerd") {
		t.Errorf("helm install --dry-run=server printed no usable NOTES:\n%s", out)
	} else {
		t.Logf("NOTES:%s", out[strings.Index(out, "NOTES:")+len("NOTES:"):])
	}
	// The same for CRI-O nodes: the server accepts the objects, and NOTES
	// name the registries.conf drop-in instead of hosts.toml.
	out, err = helm(t, "install", "peerd", chartDir, "--namespace", "peerd", "--dry-run=server", "--set", "runtime=crio",
		"--kubeconfig", api.Kubeconfig(t, "admin"))
	if err != nil {
		t.Fatalf("helm install --dry-run=server --set runtime=crio: %v", err)
	}
	if notes := out[strings.Index(out, "NOTES:")+1:]; !strings.Contains(notes, "CRI-O and Podman on each node") || strings.Contains(notes, "hosts.toml") {
		t.Errorf("NOTES for CRI-O nodes:%s", notes)
	}
	for name, values := range chartValueSets {
		t.Run(name, func(t *testing.T) {
			if values != "" {
				vf := filepath.Join(t.TempDir(), "values.yaml")
				writeFile(t, vf, values)
				if _, err := helm(t, "lint", "--strict", chartDir, "--values", vf); err != nil {
					t.Fatalf("helm lint: %v", err)
				}
			}
			objs := renderChart(t, values)
			t.Logf("rendered %v", kinds(objs))
			checkPeerdArgs(t, objs)
			checkMonitors(t, objs)
			for _, o := range objs {
				gvk := o.u.GroupVersionKind()
				m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
				if err != nil {
					if gvk.Group == "monitoring.coreos.com" {
						// No Prometheus Operator CRDs on this API server:
						// checkMonitors (below) checks these objects' shape.
						continue
					}
					t.Fatalf("%s: the API server does not serve %s: %v", o.source, gvk, err)
				}
				var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
				if m.Scope.Name() == "namespace" {
					ri = dyn.Resource(m.Resource).Namespace(o.u.GetNamespace())
				}
				dry := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: "Strict"}
				if _, err = ri.Create(ctx, o.u, dry); err != nil {
					t.Errorf("%s: server-side dry-run of %s %s refused: %v", o.source, gvk.Kind, o.u.GetName(), err)
				}
				if gvk.Kind == "DaemonSet" {
					// The check can fail: the server refuses an unknown field and a bad value.
					bad := o.u.DeepCopy()
					unstructured.SetNestedField(bad.Object, true, "spec", "template", "spec", "hostNetwrok")
					if _, err := ri.Create(ctx, bad, dry); err == nil {
						t.Errorf("%s: dry-run accepted an unknown field", o.source)
					}
					bad = o.u.DeepCopy()
					unstructured.SetNestedField(bad.Object, "Sometimes", "spec", "template", "spec", "restartPolicy")
					if _, err := ri.Create(ctx, bad, dry); err == nil {
						t.Errorf("%s: dry-run accepted restartPolicy Sometimes", o.source)
					}
				}
			}
		})
	}
}

// checkPeerdArgs checks that every container of the rendered chart that
// runs peerd (its first argument is one of peerd's subcommands) passes only
// flags the binary under test knows: one it lacks would crash-loop the pods
// on every node. It returns how many containers it checked.
func checkPeerdArgs(t *testing.T, objs []rendered) int {
	t.Helper()
	checked := 0
	for _, o := range objs {
		for _, field := range []string{"containers", "initContainers"} {
			ctrs, _, _ := unstructured.NestedSlice(o.u.Object, "spec", "template", "spec", field)
			for _, c := range ctrs {
				raw, _ := c.(map[string]any)["args"].([]any)
				if len(raw) == 0 {
					continue
				}
				sub, _ := raw[0].(string)
				if sub == "" || strings.HasPrefix(sub, "-") {
					continue // not peerd (the cleanup hook's pause container)
				}
				if help := subHelp(sub); !strings.Contains(help, "usage: peerd "+sub) {
					t.Errorf("%s: container args start with %q, which peerd does not know:\n%s", o.source, sub, help)
					continue
				}
				checked++
				for _, a := range raw[1:] {
					arg, _ := a.(string)
					name, _, _ := strings.Cut(strings.TrimLeft(arg, "-"), "=")
					if !strings.HasPrefix(arg, "-") || !subHasFlag(sub, name) {
						t.Errorf("%s: peerd %s is passed %q, not a flag it knows", o.source, sub, arg)
					}
				}
			}
		}
	}
	if checked == 0 {
		t.Error("no container of the chart runs peerd")
	}
	return checked
}

// TestHelmChartShape checks what the chart must say, not merely that it renders.
func TestHelmChartShape(t *testing.T) {
	objs := renderChart(t, "")
	checkDefaultDaemonSet(t, find(t, objs, "DaemonSet", "peerd"))
	// The default chart runs peerd in four containers: the daemon, its
	// containerd-config init container, and the uninstall hook's two.
	if n := checkPeerdArgs(t, objs); n < 4 {
		t.Errorf("checked the args of %d peerd containers, want 4", n)
	}

	// RBAC: exactly what peerd uses, nothing cluster-wide beyond events and nodes.
	role := find(t, objs, "Role", "peerd").u
	cr := find(t, objs, "ClusterRole", "peerd").u
	wantRules(t, role, []string{"coordination.k8s.io/leases[peerd-bootstrap]:get,update,list,watch", "coordination.k8s.io/leases:create"})
	wantRules(t, cr, []string{"/events:create,patch", "/nodes:get"})

	// The headless Service publishes pods before they are ready (dns bootstrap).
	svc := find(t, objs, "Service", "peerd-p2p").u
	if v, _, _ := unstructured.NestedBool(svc.Object, "spec", "publishNotReadyAddresses"); !v {
		t.Error("headless Service does not publish not-ready addresses: the first pods could never find each other")
	}
	if v, _, _ := unstructured.NestedString(svc.Object, "spec", "clusterIP"); v != "None" {
		t.Errorf("Service clusterIP %q, want None (headless)", v)
	}

	// Uninstall restores containerd's config on every node.
	hookDS := find(t, objs, "DaemonSet", "peerd-cleanup").u
	if hookDS.GetAnnotations()["helm.sh/hook"] != "post-delete" {
		t.Errorf("cleanup DaemonSet hook %q, want post-delete", hookDS.GetAnnotations()["helm.sh/hook"])
	}
	inits, _, _ := unstructured.NestedSlice(hookDS.Object, "spec", "template", "spec", "initContainers")
	if len(inits) != 1 || !strings.Contains(fmt.Sprint(inits[0]), "--remove") {
		t.Errorf("cleanup init container %v does not run containerd-config --remove", inits)
	}
	find(t, objs, "Job", "peerd-cleanup-wait")
	if k := kinds(objs); k["ServiceMonitor"]+k["PodMonitor"] != 0 {
		t.Errorf("the default chart renders Prometheus Operator objects: %v", k)
	}

	// With monitoring on, both monitors render and point at peerd's metrics.
	mon := renderChart(t, "http: {bindAddress: 0.0.0.0}\nmonitoring: {serviceMonitor: {enabled: true, labels: {release: prom}}, podMonitor: {enabled: true}}\n")
	if n := checkMonitors(t, mon); n != 2 {
		t.Errorf("checked %d monitors, want a ServiceMonitor and a PodMonitor", n)
	}
	if l := find(t, mon, "ServiceMonitor", "peerd").u.GetLabels()["release"]; l != "prom" {
		t.Errorf("ServiceMonitor label release=%q, want prom (from monitoring.serviceMonitor.labels)", l)
	}

	// Bad values fail to render, with a reason.
	for values, want := range map[string]string{
		// Caught by values.schema.json:
		"bootstrap: {mode: gossip}":     "/bootstrap/mode",
		"http: {bindAddress: 10.0.0.1}": "/http/bindAddress",
		"registries: []":                "/registries",
		"bootstap: {mode: dns}":         "bootstap",
		"cache: {size: lots}":           "/cache/size",
		"log: {level: verbose}":         "/log/level",
		// Caught by the templates (combinations a schema cannot express):
		"bootstrap: {mode: static}":                              "bootstrap.static",
		"monitoring: {podMonitor: {enabled: true}}":              "bindAddress",
		"rbac: {create: false}\nserviceAccount: {create: false}": "rbac.create",
	} {
		vf := filepath.Join(t.TempDir(), "values.yaml")
		writeFile(t, vf, values)
		_, err := helm(t, "template", "peerd", chartDir, "--namespace", "peerd", "--values", vf)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("values %q: err %v, want a failure naming %q", values, err, want)
		}
	}
}

// The Prometheus Operator's monitoring.coreos.com/v1 fields the chart uses;
// decoding rejects any other, as the operator's CRD schema would.
type monitorSpec struct {
	Selector          metav1.LabelSelector `json:"selector"`
	NamespaceSelector struct {
		Any        bool     `json:"any,omitempty"`
		MatchNames []string `json:"matchNames,omitempty"`
	} `json:"namespaceSelector"`
	Endpoints           []monitorEndpoint `json:"endpoints,omitempty"`           // ServiceMonitor
	PodMetricsEndpoints []monitorEndpoint `json:"podMetricsEndpoints,omitempty"` // PodMonitor
}

type monitorEndpoint struct {
	Port     string `json:"port"`
	Path     string `json:"path"`
	Interval string `json:"interval,omitempty"`
	Scheme   string `json:"scheme,omitempty"`
}

// checkMonitors checks every ServiceMonitor and PodMonitor in objs against
// the objects they must select: the ServiceMonitor selects the peerd
// Service in its namespace and scrapes a Service port that leads to the
// container's HTTP port; the PodMonitor selects the DaemonSet's pods and
// scrapes that container port; both scrape the path peerd serves metrics on
// (asked of a running peerd). It returns how many monitors it checked.
func checkMonitors(t *testing.T, objs []rendered) int {
	t.Helper()
	var monitors []rendered
	for _, o := range objs {
		if o.u.GroupVersionKind().Group == "monitoring.coreos.com" {
			monitors = append(monitors, o)
		}
	}
	if len(monitors) == 0 {
		return 0
	}
	ds := find(t, objs, "DaemonSet", "peerd").obj.(*appsv1.DaemonSet)
	var svc *corev1.Service
	for _, o := range objs {
		if s, ok := o.obj.(*corev1.Service); ok {
			svc = s
		}
	}
	if svc == nil {
		t.Fatal("monitors rendered without a Service to select")
	}
	// The container's HTTP port is the one --http-addr listens on.
	var httpPort corev1.ContainerPort
	c := ds.Spec.Template.Spec.Containers[0]
	for _, p := range c.Ports {
		if slices.ContainsFunc(c.Args, func(a string) bool {
			return strings.HasPrefix(a, "--http-addr=") && strings.HasSuffix(a, fmt.Sprintf(":%d", p.ContainerPort))
		}) {
			httpPort = p
		}
	}
	if httpPort.Name == "" {
		t.Fatalf("no named container port is peerd's --http-addr port (ports %v, args %v)", c.Ports, c.Args)
	}
	metricsPath := servedMetricsPath(t)
	for _, o := range monitors {
		if o.u.GroupVersionKind().Version != "v1" {
			t.Errorf("%s: %s, want monitoring.coreos.com/v1", o.source, o.u.GetAPIVersion())
		}
		raw, _ := stdjson.Marshal(o.u.Object["spec"])
		dec := stdjson.NewDecoder(bytes.NewReader(raw))
		dec.DisallowUnknownFields()
		var spec monitorSpec
		if err := dec.Decode(&spec); err != nil {
			t.Errorf("%s: %s spec has a field the operator does not know: %v", o.source, o.u.GetKind(), err)
			continue
		}
		if o.u.GetNamespace() != "peerd" || !slices.Equal(spec.NamespaceSelector.MatchNames, []string{"peerd"}) {
			t.Errorf("%s: namespace %q, namespaceSelector %v: want peerd", o.source, o.u.GetNamespace(), spec.NamespaceSelector.MatchNames)
		}
		sel, err := metav1.LabelSelectorAsSelector(&spec.Selector)
		if err != nil || sel.Empty() {
			t.Errorf("%s: selector %v: %v (an empty one selects everything)", o.source, spec.Selector, err)
			continue
		}
		var eps []monitorEndpoint
		switch o.u.GetKind() {
		case "ServiceMonitor":
			eps = spec.Endpoints
			if !sel.Matches(labels.Set(svc.Labels)) {
				t.Errorf("%s: selector %v does not select Service %s (labels %v)", o.source, spec.Selector, svc.Name, svc.Labels)
			}
			for _, ep := range eps {
				i := slices.IndexFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == ep.Port })
				if i < 0 {
					t.Errorf("%s: endpoint port %q is not a port of Service %s", o.source, ep.Port, svc.Name)
				} else if tp := svc.Spec.Ports[i].TargetPort.String(); tp != httpPort.Name && tp != fmt.Sprint(httpPort.ContainerPort) {
					t.Errorf("%s: Service port %q leads to %s, not peerd's HTTP port %s", o.source, ep.Port, tp, httpPort.Name)
				}
			}
		case "PodMonitor":
			eps = spec.PodMetricsEndpoints
			if !sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
				t.Errorf("%s: selector %v does not select the DaemonSet's pods (labels %v)", o.source, spec.Selector, ds.Spec.Template.Labels)
			}
			for _, ep := range eps {
				if ep.Port != httpPort.Name {
					t.Errorf("%s: endpoint port %q, want peerd's HTTP container port %q", o.source, ep.Port, httpPort.Name)
				}
			}
		default:
			t.Errorf("%s: unexpected %s", o.source, o.u.GetKind())
		}
		if len(eps) != 1 {
			t.Errorf("%s: %d endpoints, want 1", o.source, len(eps))
		}
		for _, ep := range eps {
			if ep.Path != metricsPath {
				t.Errorf("%s: scrapes %q, peerd serves its metrics at %q", o.source, ep.Path, metricsPath)
			}
		}
	}
	return len(monitors)
}

var metricsPathOnce struct {
	sync.Once
	path string
}

// servedMetricsPath asks a running peerd where its Prometheus metrics are.
func servedMetricsPath(t *testing.T) string {
	t.Helper()
	metricsPathOnce.Do(func() {
		n := StartNode(t, NodeOpts{})
		for _, p := range []string{"/metrics/prometheus", "/metrics"} {
			if code, _, body := Get(t, "GET", n.URL(p), nil); code == 200 && bytes.Contains(body, []byte("# TYPE peerd_")) {
				metricsPathOnce.path = p
				return
			}
		}
	})
	if metricsPathOnce.path == "" {
		t.Fatal("a running peerd serves no Prometheus text with peerd_ metrics at /metrics/prometheus or /metrics")
	}
	return metricsPathOnce.path
}

func checkDefaultDaemonSet(t *testing.T, d rendered) {
	t.Helper()
	u := d.u
	pod, _, _ := unstructured.NestedMap(u.Object, "spec", "template", "spec")
	if pod["hostNetwork"] != true {
		t.Error("DaemonSet is not hostNetwork: containerd could not reach 127.0.0.1:30000")
	}
	inits, _ := pod["initContainers"].([]any)
	if len(inits) != 1 || !strings.Contains(fmt.Sprint(inits[0]), "containerd-config") {
		t.Errorf("init containers %v: want one running containerd-config", inits)
	}
	ctrs, _ := pod["containers"].([]any)
	if len(ctrs) != 1 {
		t.Fatalf("%d containers, want 1", len(ctrs))
	}
	c := ctrs[0].(map[string]any)
	args := fmt.Sprint(c["args"])
	for _, want := range []string{"--bootstrap-mode=k8s-lease", "--lease-name=peerd-bootstrap", "--mount=/peerd/blobs", "--http-addr=127.0.0.1:30000", "--p2p-addr=/ip4/$(NODE_IP)/tcp/30001", "--containerd-socket=/run/containerd/containerd.sock"} {
		if !strings.Contains(args, want) {
			t.Errorf("peerd args %s lack %s", args, want)
		}
	}
	for _, probe := range []string{"readinessProbe", "livenessProbe"} {
		host, _, _ := unstructured.NestedString(c, probe, "httpGet", "host")
		path, _, _ := unstructured.NestedString(c, probe, "httpGet", "path")
		if host != "127.0.0.1" || (path != "/readyz" && path != "/healthz") {
			t.Errorf("%s: host %q path %q, want 127.0.0.1 and /readyz or /healthz", probe, host, path)
		}
	}
	if v, _, _ := unstructured.NestedBool(c, "securityContext", "privileged"); !v {
		t.Error("peerd container is not privileged: FUSE with a Bidirectional mount needs it")
	}
	mounts := fmt.Sprint(c["volumeMounts"])
	if !strings.Contains(mounts, "mountPropagation:Bidirectional") {
		t.Errorf("volume mounts %s: want /peerd Bidirectional", mounts)
	}
	// A hostPath of type Socket or CharDevice keeps kubelet from starting the
	// pod when the file is missing; peerd must start and say what to fix
	// (itest/cri_test.go runs the pod on a node without them).
	vols := fmt.Sprint(pod["volumes"])
	if strings.Contains(vols, "type:Socket") || strings.Contains(vols, "type:CharDevice") || strings.Contains(mounts, "/dev/fuse") {
		t.Errorf("volumes %s: a missing socket or /dev/fuse would keep the pod from starting", vols)
	}
}

// wantRules compares an RBAC object's rules, as "group/resource[names]:verbs".
func wantRules(t *testing.T, u *unstructured.Unstructured, want []string) {
	t.Helper()
	rules, _, _ := unstructured.NestedSlice(u.Object, "rules")
	var got []string
	for _, r := range rules {
		m := r.(map[string]any)
		str := func(k string) string {
			var s []string
			for _, v := range m[k].([]any) {
				s = append(s, v.(string))
			}
			return strings.Join(s, ",")
		}
		names := ""
		if _, ok := m["resourceNames"]; ok {
			names = "[" + str("resourceNames") + "]"
		}
		got = append(got, str("apiGroups")+"/"+str("resources")+names+":"+str("verbs"))
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("%s %s rules %v, want %v", u.GetKind(), u.GetName(), got, want)
	}
}

// TestHelmUninstallHookWait runs the uninstall hook's waiting step for real:
// the chart's cleanup DaemonSet and hook RBAC are created on the API server,
// and `peerd k8s-wait-daemonset` runs as the hook's ServiceAccount. There is
// no kubelet here, so the test plays the DaemonSet controller's part by
// writing the status.
func TestHelmUninstallHookWait(t *testing.T) {
	api := startKubeAPI(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := api.Admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "peerd"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	objs := renderChart(t, "fullnameOverride: peerd\n")
	var ds *appsv1.DaemonSet
	for _, o := range objs {
		if o.u.GetAnnotations()["helm.sh/hook"] != "post-delete" {
			continue
		}
		switch o.u.GetKind() {
		case "ServiceAccount", "Role", "RoleBinding":
			if err := createUnstructured(ctx, api, o.u); err != nil {
				t.Fatalf("create %s: %v", o.u.GetKind(), err)
			}
		case "DaemonSet":
			var err error
			if ds, err = api.Admin.AppsV1().DaemonSets("peerd").Create(ctx, o.obj.(*appsv1.DaemonSet), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if ds == nil || ds.Name != "peerd-cleanup" {
		t.Fatalf("no cleanup DaemonSet among the post-delete hooks")
	}
	job := find(t, objs, "Job", "peerd-cleanup-wait").obj.(*batchv1.Job)
	args := job.Spec.Template.Spec.Containers[0].Args
	if len(args) == 0 || args[0] != "k8s-wait-daemonset" || !slices.Contains(args, "--name=peerd-cleanup") {
		t.Fatalf("hook Job runs %v, want k8s-wait-daemonset --name=peerd-cleanup", args)
	}
	kubeconfig := api.Kubeconfig(t, "system:serviceaccount:peerd:peerd-cleanup")
	wait := func(timeout string) (string, error) {
		cmd := exec.CommandContext(ctx, peerdBin, append(args, "--kubeconfig="+kubeconfig, "--timeout="+timeout)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	// Not done yet (no node has run it): the wait times out and says where it stands.
	out, err := wait("3s")
	if err == nil || !strings.Contains(out, "not seen the latest spec") {
		t.Fatalf("wait on an unprocessed DaemonSet: err %v, output:\n%s", err, out)
	}
	// Two of three nodes done: still waiting.
	ds.Status = appsv1.DaemonSetStatus{ObservedGeneration: ds.Generation, DesiredNumberScheduled: 3, UpdatedNumberScheduled: 3, NumberReady: 2, CurrentNumberScheduled: 3}
	if ds, err = api.Admin.AppsV1().DaemonSets("peerd").UpdateStatus(ctx, ds, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if out, err := wait("3s"); err == nil || !strings.Contains(out, "2 of 3 pods ready") {
		t.Fatalf("wait with a node left: err %v, output:\n%s", err, out)
	}
	// Every node done: the wait ends, with the hook's own least-privilege account.
	ds.Status.NumberReady = 3
	if _, err = api.Admin.AppsV1().DaemonSets("peerd").UpdateStatus(ctx, ds, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if out, err := wait("30s"); err != nil || !strings.Contains(out, "3 of 3 pods ready") {
		t.Fatalf("wait with every node done: err %v, output:\n%s", err, out)
	}
}

// recorder is a Registerer that registers on a real registry and keeps the
// name of every metric registered, from the collectors' descriptors (a
// Gather lists only the labelled metrics that have been used).
type recorder struct {
	*prometheus.Registry
	names map[string]bool
}

var fqNameRE = regexp.MustCompile(`fqName: "([^"]+)"`)

func (r *recorder) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc, 64)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		if m := fqNameRE.FindStringSubmatch(d.String()); m != nil {
			r.names[m[1]] = true
		}
	}
	return r.Registry.Register(c)
}

func (r *recorder) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

// registeredMetrics builds the components whose metrics peerd registers
// (cmd/peerd wires the same ones onto its registry: the cache, the HTTP
// server, the p2p node and its source, the k8s bootstrap) on a recorder,
// and returns every metric name they registered.
func registeredMetrics(t *testing.T) map[string]bool {
	t.Helper()
	rec := &recorder{Registry: prometheus.NewRegistry(), names: map[string]bool{}}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	c, err := cache.Open(cache.Options{Dir: t.TempDir(), Registerer: rec, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	httpmirror.New(httpmirror.Config{Cache: c, Registry: rec, Gatherer: rec, Logger: log})
	k8s.NewMetrics(rec)
	key, err := p2p.LoadOrCreateKey(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ip := NextIP()
	node, err := p2p.New(context.Background(), p2p.Config{Key: key, Registerer: rec, Logger: log,
		ListenAddr: fmt.Sprintf("/ip4/%s/tcp/%d", ip, FreePort(t, ip)),
		PeerAddr:   net.JoinHostPort(ip, strconv.Itoa(FreePort(t, ip)))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	rec.MustRegister(node.Source().Collectors()...)
	return rec.names
}

// TestGrafanaDashboardMetricsExist keeps the dashboard honest: every metric
// a panel queries is one peerd registers (a rename breaks this test, not a
// dashboard in production).
func TestGrafanaDashboardMetricsExist(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(chartDir, "dashboards", "peerd.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := stdjson.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	registered := registeredMetrics(t)
	t.Logf("%d metric names registered", len(registered))
	used := regexp.MustCompile(`peerd_[a-zA-Z0-9_]+`)
	n := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, m := range used.FindAllString(tg.Expr, -1) {
				n++
				base := m
				for _, suf := range []string{"_bucket", "_count", "_sum"} {
					if b, ok := strings.CutSuffix(m, suf); ok && registered[b] {
						base = b
					}
				}
				if !registered[base] {
					t.Errorf("panel %q queries %s, which peerd does not register", p.Title, m)
				}
			}
		}
	}
	if n < 10 {
		t.Fatalf("found only %d metric references in the dashboard", n)
	}
}

// With runtime: crio the chart writes CRI-O's registries.conf drop-in
// instead of containerd's hosts.toml, runs peerd without containerd, mounts
// nothing of containerd's, and its uninstall hook removes the drop-in. The
// init container's and the hook's args are run with the real binary on a
// folder standing for the node's registries.conf.d.
func TestHelmChartCRIO(t *testing.T) {
	objs := renderChart(t, "runtime: crio\n")
	if n := checkPeerdArgs(t, objs); n < 4 {
		t.Errorf("checked the args of %d peerd containers, want 4", n)
	}
	ds := find(t, objs, "DaemonSet", "peerd").u
	pod, _, _ := unstructured.NestedMap(ds.Object, "spec", "template", "spec")
	inits, _ := pod["initContainers"].([]any)
	if len(inits) != 1 {
		t.Fatalf("%d init containers, want 1", len(inits))
	}
	initArgs := stringArgs(inits[0])
	if len(initArgs) == 0 || initArgs[0] != "registries-config" || !slices.Contains(initArgs, "--conf-dir=/etc/containers/registries.conf.d") {
		t.Fatalf("init container args %v: want registries-config --conf-dir=/etc/containers/registries.conf.d", initArgs)
	}
	ctrs, _ := pod["containers"].([]any)
	args := stringArgs(ctrs[0])
	if !slices.Contains(args, "--containerd-socket=") {
		t.Errorf("peerd args %v: want --containerd-socket= (no containerd)", args)
	}
	for _, a := range args {
		if strings.HasPrefix(a, "--containerd-") && a != "--containerd-socket=" {
			t.Errorf("peerd args pass %s on a CRI-O node", a)
		}
	}
	vols := fmt.Sprint(pod["volumes"])
	if strings.Contains(vols, "containerd") || !strings.Contains(vols, "path:/etc/containers/registries.conf.d") {
		t.Errorf("volumes %s: want registries.conf.d and nothing of containerd's", vols)
	}
	hook := find(t, objs, "DaemonSet", "peerd-cleanup").u
	hookInits, _, _ := unstructured.NestedSlice(hook.Object, "spec", "template", "spec", "initContainers")
	if len(hookInits) != 1 {
		t.Fatalf("uninstall hook: %d init containers, want 1", len(hookInits))
	}
	removeArgs := stringArgs(hookInits[0])
	if len(removeArgs) < 2 || removeArgs[0] != "registries-config" || !slices.Contains(removeArgs, "--remove") {
		t.Fatalf("uninstall hook args %v: want registries-config --remove", removeArgs)
	}

	// The rendered commands, on a folder standing for the node's.
	dir := t.TempDir()
	run := func(a []string) {
		t.Helper()
		var real []string
		for _, s := range a {
			if v, ok := strings.CutPrefix(s, "--conf-dir="); ok && v == "/etc/containers/registries.conf.d" {
				s = "--conf-dir=" + dir
			}
			real = append(real, s)
		}
		if out, err := exec.Command(peerdBin, real...).CombinedOutput(); err != nil {
			t.Fatalf("peerd %v: %v\n%s", real, err, out)
		}
	}
	run(initArgs)
	conf, err := os.ReadFile(filepath.Join(dir, "zz-peerd.conf"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(conf), "location = '127.0.0.1:30000/peerd/docker.io'") {
		t.Fatalf("drop-in written by the init container does not name the node's mirror:\n%s", conf)
	}
	run(initArgs) // a restarted pod changes nothing
	run(removeArgs)
	if _, err := os.Stat(filepath.Join(dir, "zz-peerd.conf")); !os.IsNotExist(err) {
		t.Fatalf("the uninstall hook left the drop-in: %v", err)
	}
}

// stringArgs returns a rendered container's args.
func stringArgs(c any) []string {
	raw, _ := c.(map[string]any)["args"].([]any)
	var out []string
	for _, a := range raw {
		s, _ := a.(string)
		out = append(out, s)
	}
	return out
}
