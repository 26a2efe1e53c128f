// Command e2eclient is the HTTP client of the e2e cluster. The test process
// lives in the root network namespace, which by design cannot reach the
// cluster's addresses; it runs this binary inside a namespace
// (ip netns exec) to push images, read blobs and scrape metrics there.
//
//	e2eclient push -registry 127.0.0.1:5000 -repo e2e/img -tag t1 -dir DIR
//	e2eclient get -url URL [-out FILE|-] [-sha256 HEX] [-compare FILE] [-seg N -order random -seed S -parallel P]
//	e2eclient wait -url URL [-timeout 30s]
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: e2eclient push|get|wait [flags]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "push":
		err = push(ctx, os.Args[2:])
	case "get":
		err = get(ctx, os.Args[2:])
	case "wait":
		err = wait(ctx, os.Args[2:])
	case "first":
		err = first(ctx, os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2eclient:", err)
		os.Exit(1)
	}
}

func client(timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			Proxy:                 nil, // never a proxy from the environment: traffic stays in the namespace
			DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			ResponseHeaderTimeout: 2 * time.Minute,
			MaxIdleConnsPerHost:   16,
			DisableCompression:    true,
		},
		// Redirects are followed only within the same host: nothing leaves the cluster.
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) > 0 && req.URL.Host != via[0].URL.Host {
				return fmt.Errorf("refusing redirect to another host %s", req.URL.Host)
			}
			return nil
		},
	}
}

// push uploads every blob under DIR/blobs/sha256/ and then DIR/manifest.json
// through the distribution API (monolithic uploads), and prints the
// manifest's digest.
func push(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("push", flag.ExitOnError)
	reg := fs.String("registry", "127.0.0.1:5000", "registry host:port (plain HTTP)")
	repo := fs.String("repo", "", "repository")
	tag := fs.String("tag", "", "tag")
	dir := fs.String("dir", "", "image folder: blobs/sha256/<hex> and manifest.json")
	timeout := fs.Duration("timeout", 30*time.Minute, "bound on the whole push")
	fs.Parse(args)
	if *repo == "" || *tag == "" || *dir == "" {
		return errors.New("push: -repo, -tag and -dir are required")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	c := client(0)
	base := "http://" + *reg + "/v2/" + *repo
	entries, err := os.ReadDir(filepath.Join(*dir, "blobs", "sha256"))
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := pushBlob(ctx, c, base, filepath.Join(*dir, "blobs", "sha256", e.Name()), "sha256:"+e.Name()); err != nil {
			return err
		}
	}
	man, err := os.ReadFile(filepath.Join(*dir, "manifest.json"))
	if err != nil {
		return err
	}
	var head struct {
		MediaType string `json:"mediaType"`
	}
	if err := json.Unmarshal(man, &head); err != nil || head.MediaType == "" {
		return fmt.Errorf("manifest.json: no mediaType (%v)", err)
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPut, base+"/manifests/"+*tag, bytes.NewReader(man))
	req.Header.Set("Content-Type", head.MediaType)
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("put manifest: %w", err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("put manifest: %s: %s", resp.Status, body)
	}
	sum := sha256.Sum256(man)
	fmt.Println("sha256:" + hex.EncodeToString(sum[:]))
	return nil
}

func pushBlob(ctx context.Context, c *http.Client, base, file, digest string) error {
	req, _ := http.NewRequestWithContext(ctx, http.MethodHead, base+"/blobs/"+digest, nil)
	if resp, err := c.Do(req); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			return nil
		}
	}
	req, _ = http.NewRequestWithContext(ctx, http.MethodPost, base+"/blobs/uploads/", nil)
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("start upload of %s: %w", digest, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		return fmt.Errorf("start upload of %s: %s", digest, resp.Status)
	}
	loc, err := resp.Location()
	if err != nil {
		return fmt.Errorf("start upload of %s: %w", digest, err)
	}
	q := loc.Query()
	q.Set("digest", digest)
	loc.RawQuery = q.Encode()
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	req, _ = http.NewRequestWithContext(ctx, http.MethodPut, loc.String(), f)
	req.ContentLength = st.Size()
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = c.Do(req)
	if err != nil {
		return fmt.Errorf("upload %s: %w", digest, err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("upload %s: %s: %s", digest, resp.Status, body)
	}
	return nil
}

type result struct {
	Bytes   int64   `json:"bytes"`
	SHA256  string  `json:"sha256,omitempty"`
	Seconds float64 `json:"seconds"`
}

// get reads URL whole (one GET, hashed) or, with -seg, as Range requests of
// -seg bytes in sequential or shuffled order, the way Overlaybd reads a
// layer: first a bytes=0-0 probe for the size, then the ranges, several at a
// time. It prints a JSON result line.
// first times a GET of a URL's first n bytes (a Range request) until they
// arrived, and prints {"bytes":…,"seconds":…}.
func first(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("first", flag.ExitOnError)
	u := fs.String("url", "", "URL to read")
	n := fs.Int64("n", 1, "bytes from the start")
	fs.Parse(args)
	if *u == "" || *n <= 0 {
		return errors.New("first: -url and a positive -n are required")
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	start := time.Now()
	b, err := readRange(ctx, client(0), *u, 0, *n-1)
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{"bytes": len(b), "seconds": time.Since(start).Seconds()})
}

func get(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("get", flag.ExitOnError)
	u := fs.String("url", "", "URL to read")
	out := fs.String("out", "", "write the body here (- for stdout); whole reads only")
	want := fs.String("sha256", "", "fail unless the body hashes to this hex digest")
	compare := fs.String("compare", "", "fail unless every range read equals the same range of this file")
	seg := fs.Int64("seg", 0, "read in Range requests of this many bytes (0: one GET)")
	order := fs.String("order", "random", "order of the ranges: random or seq")
	seed := fs.Uint64("seed", 1, "seed of the random order")
	parallel := fs.Int("parallel", 4, "ranges in flight at once")
	timeout := fs.Duration("timeout", 20*time.Minute, "bound on the whole read")
	fs.Parse(args)
	if *u == "" {
		return errors.New("get: -url is required")
	}
	if _, err := url.Parse(*u); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	c := client(0)
	start := time.Now()
	var res result
	var err error
	if *seg <= 0 {
		res, err = getWhole(ctx, c, *u, *out)
	} else {
		res, err = getRanges(ctx, c, *u, *seg, *order, *seed, *parallel, *compare)
	}
	if err != nil {
		return err
	}
	if *want != "" && res.SHA256 != *want {
		return fmt.Errorf("get %s: body hashes to %s, want %s", *u, res.SHA256, *want)
	}
	if *compare != "" && *seg <= 0 {
		sum, err := hashFile(*compare)
		if err != nil {
			return err
		}
		if sum != res.SHA256 {
			return fmt.Errorf("get %s: body hashes to %s, %s hashes to %s", *u, res.SHA256, *compare, sum)
		}
	}
	res.Seconds = time.Since(start).Seconds()
	if *out == "-" {
		return nil
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

func getWhole(ctx context.Context, c *http.Client, u, out string) (result, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return result{}, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return result{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return result{}, fmt.Errorf("get %s: %s: %s", u, resp.Status, strings.TrimSpace(string(body)))
	}
	var w io.Writer = io.Discard
	switch out {
	case "":
	case "-":
		w = os.Stdout
	default:
		f, err := os.Create(out)
		if err != nil {
			return result{}, err
		}
		defer f.Close()
		w = f
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(w, h), resp.Body)
	if err != nil {
		return result{}, fmt.Errorf("get %s: after %d bytes: %w", u, n, err)
	}
	if resp.ContentLength >= 0 && n != resp.ContentLength {
		return result{}, fmt.Errorf("get %s: %d bytes, Content-Length %d", u, n, resp.ContentLength)
	}
	return result{Bytes: n, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// probeSize asks for the first byte and reads the total from Content-Range,
// as Overlaybd does.
func probeSize(ctx context.Context, c *http.Client, u string) (int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Range", "bytes=0-0")
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusPartialContent {
		return 0, fmt.Errorf("size probe of %s: %s, want 206", u, resp.Status)
	}
	cr := resp.Header.Get("Content-Range")
	i := strings.LastIndexByte(cr, '/')
	if i < 0 {
		return 0, fmt.Errorf("size probe of %s: Content-Range %q", u, cr)
	}
	return strconv.ParseInt(cr[i+1:], 10, 64)
}

func getRanges(ctx context.Context, c *http.Client, u string, seg int64, order string, seed uint64, parallel int, compare string) (result, error) {
	size, err := probeSize(ctx, c, u)
	if err != nil {
		return result{}, err
	}
	var ref *os.File
	if compare != "" {
		if ref, err = os.Open(compare); err != nil {
			return result{}, err
		}
		defer ref.Close()
	}
	n := (size + seg - 1) / seg
	idx := make([]int64, n)
	for i := range idx {
		idx[i] = int64(i)
	}
	switch order {
	case "seq":
	case "random":
		r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
		r.Shuffle(len(idx), func(i, j int) { idx[i], idx[j] = idx[j], idx[i] })
	default:
		return result{}, fmt.Errorf("-order %q: want random or seq", order)
	}
	if parallel < 1 {
		parallel = 1
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var next atomic.Int64
	var total atomic.Int64
	var wg sync.WaitGroup
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				off := idx[i] * seg
				end := min(off+seg, size) - 1
				got, err := readRange(ctx, c, u, off, end)
				if err == nil && ref != nil {
					wantb := make([]byte, end-off+1)
					if _, rerr := ref.ReadAt(wantb, off); rerr != nil && rerr != io.EOF {
						err = rerr
					} else if !bytes.Equal(got, wantb) {
						err = fmt.Errorf("range %d-%d of %s differs from %s", off, end, u, compare)
					}
				}
				if err != nil {
					cancel(err)
					return
				}
				total.Add(int64(len(got)))
			}
		}()
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return result{}, err
	}
	return result{Bytes: total.Load()}, nil
}

func readRange(ctx context.Context, c *http.Client, u string, off, end int64) ([]byte, error) {
	rctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, end))
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("range %d-%d: %w", off, end, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusPartialContent {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("range %d-%d of %s: %s: %s", off, end, u, resp.Status, strings.TrimSpace(string(body)))
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("range %d-%d of %s: after %d bytes: %w", off, end, u, len(b), err)
	}
	if int64(len(b)) != end-off+1 {
		return nil, fmt.Errorf("range %d-%d of %s: %d bytes", off, end, u, len(b))
	}
	return b, nil
}

func hashFile(name string) (string, error) {
	f, err := os.Open(name)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// wait polls URL until it answers 200.
func wait(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("wait", flag.ExitOnError)
	u := fs.String("url", "", "URL to poll")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	fs.Parse(args)
	if *u == "" {
		return errors.New("wait: -url is required")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	c := client(2 * time.Second)
	var last string
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, *u, nil)
		resp, err := c.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status + ": " + strings.TrimSpace(string(body))
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait %s: not ready after %v (last: %s)", *u, *timeout, last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
