package httpmirror

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/peerd-project/peerd/internal/reliability"
	"github.com/peerd-project/peerd/upstream"
)

// fakeDNS answers every query on a loopback UDP port from names: the first
// label of the asked name picks the address (A or AAAA by its family); other
// queries get an empty answer.
func fakeDNS(t *testing.T, names map[string]netip.Addr) *net.Resolver {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Skipf("cannot listen on UDP loopback: %v", err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if resp := dnsAnswer(buf[:n], names); resp != nil {
				pc.WriteTo(resp, from)
			}
		}
	}()
	addr := pc.LocalAddr().String()
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", addr)
	}}
}

// dnsAnswer builds the reply to one query (RFC 1035 wire format).
func dnsAnswer(q []byte, names map[string]netip.Addr) []byte {
	if len(q) < 12 {
		return nil
	}
	i, first := 12, ""
	for i < len(q) && q[i] != 0 {
		l := int(q[i])
		if i+1+l > len(q) {
			return nil
		}
		if first == "" {
			first = strings.ToLower(string(q[i+1 : i+1+l]))
		}
		i += 1 + l
	}
	if i+5 > len(q) {
		return nil
	}
	qtype := binary.BigEndian.Uint16(q[i+1:])
	question := q[12 : i+5]
	resp := append([]byte{}, q[:2]...) // ID
	resp = append(resp, 0x81, 0x80)    // response, recursion desired and available, no error
	resp = append(resp, 0, 1, 0, 0, 0, 0, 0, 0)
	resp = append(resp, question...)
	ip, ok := names[first]
	if ok && ((qtype == 1 && ip.Is4()) || (qtype == 28 && ip.Is6())) {
		resp[7] = 1 // one answer
		rdata := ip.AsSlice()
		resp = append(resp, 0xc0, 12) // the name, as a pointer to the question's
		resp = binary.BigEndian.AppendUint16(resp, qtype)
		resp = append(resp, 0, 1, 0, 0, 0, 60) // class IN, TTL 60
		resp = binary.BigEndian.AppendUint16(resp, uint16(len(rdata)))
		resp = append(resp, rdata...)
	}
	return resp
}

// An allowed NAME that resolves to a link-local or metadata address is
// refused after the lookup, before any connection (the dialer's check).
func TestBlobsNameResolvingToMetadataAddress(t *testing.T) {
	res := fakeDNS(t, map[string]netip.Addr{
		"metadata": netip.MustParseAddr("169.254.169.254"),
		"ll6":      netip.MustParseAddr("fe80::1"),
		"ec2v6":    netip.MustParseAddr("fd00:ec2::254"),
		"loop":     netip.MustParseAddr("127.0.0.2"),
	})
	// The fake resolver works: an allowed name resolving to loopback is fetched.
	_, originURL := loopbackServer(t, "127.0.0.2", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok"))
	}))
	port := originURL[strings.LastIndexByte(originURL, ':')+1:]
	_, node := blobsNode(t, []string{"*.peerd-probe.test"}, nil, upstream.Options{Resolver: res, DialTimeout: 2 * time.Second})
	resp, body, _ := getWithin(t, node+"/blobs/http://loop.peerd-probe.test:"+port+"/x", 30*time.Second)
	if resp.StatusCode != http.StatusOK || string(body) != "ok" {
		t.Fatalf("name resolving to loopback: %s (%s)", resp.Status, body)
	}
	var figures []string
	for _, name := range []string{"metadata", "ll6", "ec2v6"} {
		resp, body, took := getWithin(t, node+"/blobs/http://"+name+".peerd-probe.test/latest/meta-data/"+name, 30*time.Second)
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(body), "refusing to dial") {
			t.Fatalf("%s: %s (%s), want 403 refusing to dial", name, resp.Status, body)
		}
		figures = append(figures, fmt.Sprintf("%s %d in %.1f ms", name, resp.StatusCode, float64(took.Microseconds())/1000))
	}
	reliability.Record(t, reliability.Row{Area: "probe",
		Case:    "allowed name resolving to 169.254.169.254, fe80::1 or fd00:ec2::254",
		Outcome: "403 \"refusing to dial\" after the lookup, before connect",
		Figure:  strings.Join(figures, ", ")})
}
