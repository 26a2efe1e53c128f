package testsummary

import (
	"strings"
	"testing"
)

// A go test -json stream as go 1.26 writes it for a package with a passing,
// a skipped and a failing test, one with a passing one, and a build error.
const stream = `{"Action":"start","Package":"example/a"}
{"Action":"run","Package":"example/a","Test":"TestOK"}
{"Action":"output","Package":"example/a","Test":"TestOK","Output":"=== RUN   TestOK\n"}
{"Action":"output","Package":"example/a","Test":"TestOK","Output":"    a_test.go:9: chatter of a passing test\n"}
{"Action":"output","Package":"example/a","Test":"TestOK","Output":"--- PASS: TestOK (0.00s)\n"}
{"Action":"pass","Package":"example/a","Test":"TestOK","Elapsed":0}
{"Action":"run","Package":"example/a","Test":"TestNeedsEtcd"}
{"Action":"output","Package":"example/a","Test":"TestNeedsEtcd","Output":"=== RUN   TestNeedsEtcd\n"}
{"Action":"output","Package":"example/a","Test":"TestNeedsEtcd","Output":"    kubeapi_test.go:87: missing environment: etcd not installed (apt-get install etcd-server)\n"}
{"Action":"output","Package":"example/a","Test":"TestNeedsEtcd","Output":"--- SKIP: TestNeedsEtcd (0.00s)\n"}
{"Action":"skip","Package":"example/a","Test":"TestNeedsEtcd","Elapsed":0}
{"Action":"run","Package":"example/a","Test":"TestBench"}
{"Action":"output","Package":"example/a","Test":"TestBench","Output":"=== RUN   TestBench\n"}
{"Action":"output","Package":"example/a","Test":"TestBench","Output":"    p2p_test.go:321: set PEERD_BENCH=1 to measure peer throughput\n"}
{"Action":"output","Package":"example/a","Test":"TestBench","Output":"--- SKIP: TestBench (0.00s)\n"}
{"Action":"skip","Package":"example/a","Test":"TestBench","Elapsed":0}
{"Action":"run","Package":"example/a","Test":"TestBroken"}
{"Action":"output","Package":"example/a","Test":"TestBroken","Output":"=== RUN   TestBroken\n"}
{"Action":"output","Package":"example/a","Test":"TestBroken","Output":"    a_test.go:30: got 1, want 2\n"}
{"Action":"output","Package":"example/a","Test":"TestBroken","Output":"--- FAIL: TestBroken (0.00s)\n"}
{"Action":"fail","Package":"example/a","Test":"TestBroken","Elapsed":0}
{"Action":"output","Package":"example/a","Output":"FAIL\n"}
{"Action":"output","Package":"example/a","Output":"FAIL\texample/a\t0.01s\n"}
{"Action":"fail","Package":"example/a","Elapsed":0.01}
{"Action":"start","Package":"example/b"}
{"Action":"output","Package":"example/b","Output":"PASS\n"}
{"Action":"output","Package":"example/b","Output":"ok  \texample/b\t0.02s\n"}
{"Action":"pass","Package":"example/b","Elapsed":0.02}
{"ImportPath":"example/c [example/c.test]","Action":"build-output","Output":"c/c_test.go:3:1: syntax error\n"}
{"ImportPath":"example/c [example/c.test]","Action":"build-fail"}
{"Action":"start","Package":"example/c"}
{"Action":"output","Package":"example/c","Output":"FAIL\texample/c [build failed]\n"}
{"Action":"fail","Package":"example/c","Elapsed":0,"FailedBuild":"example/c [example/c.test]"}
`

func TestFilterPrintsWhatNonVerboseGoTestPrints(t *testing.T) {
	var out strings.Builder
	res, err := Filter(strings.NewReader(stream), &out)
	if err != nil {
		t.Fatal(err)
	}
	want := "    a_test.go:30: got 1, want 2\n--- FAIL: TestBroken (0.00s)\nFAIL\nFAIL\texample/a\t0.01s\n" +
		"ok  \texample/b\t0.02s\n" +
		"c/c_test.go:3:1: syntax error\nFAIL\texample/c [build failed]\n"
	if out.String() != want {
		t.Errorf("output:\n%s\nwant:\n%s", out.String(), want)
	}
	if res.Passed != 1 || res.Failed != 1 || len(res.Skips) != 2 {
		t.Errorf("counted %d passed, %d failed, %d skipped; want 1, 1, 2", res.Passed, res.Failed, len(res.Skips))
	}
	if len(res.FailedPackages) != 1 || res.FailedPackages[0] != "example/c" {
		t.Errorf("packages failed outside a test: %v, want [example/c]", res.FailedPackages)
	}
	var rep strings.Builder
	env := Report(&rep, []string{"test"}, []Result{res})
	for _, want := range []string{
		"test: 1 passed, 1 failed, 2 skipped",
		"SKIP example/a TestBench: set PEERD_BENCH=1 to measure peer throughput",
		"SKIP example/a TestNeedsEtcd: missing environment: etcd not installed (apt-get install etcd-server)",
	} {
		if !strings.Contains(rep.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, rep.String())
		}
	}
	if len(env) != 1 || env[0].Test != "TestNeedsEtcd" {
		t.Errorf("environment skips %v, want TestNeedsEtcd alone", env)
	}
}
