package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// client reads without compression over kept-alive connections; every
// request carries its own deadline.
var client = &http.Client{Transport: &http.Transport{
	DisableCompression:    true,
	MaxIdleConnsPerHost:   256,
	ResponseHeaderTimeout: 60 * time.Second,
	ReadBufferSize:        256 << 10,
}}

func status(ctx context.Context, url string) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

func getBody(ctx context.Context, url string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return io.ReadAll(resp.Body)
}

// readRange GETs url (a Range of [off, off+n) when n > 0) and discards the
// body, checking its length. It returns the bytes read.
func readRange(ctx context.Context, url string, off, n, want int64) (int64, error) {
	return readRangeWith(ctx, client, url, off, n, want)
}

// readRangeWith is readRange through the given client.
func readRangeWith(ctx context.Context, client *http.Client, url string, off, n, want int64) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return 0, err
	}
	code := 200
	if n > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(off, 10)+"-"+strconv.FormatInt(off+n-1, 10))
		code = 206
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != code {
		return 0, fmt.Errorf("GET %s: %s, want %d", url, resp.Status, code)
	}
	got, err := io.CopyBuffer(discard, resp.Body, make([]byte, 256<<10))
	if err != nil {
		return got, fmt.Errorf("GET %s: after %d bytes: %w", url, got, err)
	}
	if got != want {
		return got, fmt.Errorf("GET %s: %d bytes, want %d", url, got, want)
	}
	return got, nil
}

// download reads a whole blob of size bytes, in one GET (chunk 0) or in
// chunk-sized Range requests one after another, and returns MiB/s.
func download(ctx context.Context, url string, size, chunk int64) (float64, error) {
	start := time.Now()
	if chunk <= 0 {
		if _, err := readRange(ctx, url, 0, 0, size); err != nil {
			return 0, err
		}
	} else {
		for off := int64(0); off < size; off += chunk {
			n := min(chunk, size-off)
			if _, err := readRange(ctx, url, off, n, n); err != nil {
				return 0, err
			}
		}
	}
	return float64(size) / (1 << 20) / time.Since(start).Seconds(), nil
}

// downloadToFile GETs url into a new file at path (written in 1 MiB
// pieces, as a cache fill writes chunks), makes it durable and returns
// MiB/s: the bytes end up on disk, as a node's cache fill puts them.
func downloadToFile(ctx context.Context, url, path string, size int64) (float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	start := time.Now()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return 0, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	// Only the Writer side of the file: no ReadFrom shortcut a cache fill
	// could not take either.
	n, err := io.CopyBuffer(struct{ io.Writer }{f}, resp.Body, make([]byte, 1<<20))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, err
	}
	if n != size {
		return 0, fmt.Errorf("GET %s: %d bytes, want %d", url, n, size)
	}
	return float64(size) / (1 << 20) / time.Since(start).Seconds(), nil
}

// ttfb is the time from sending a GET to its first body byte; the rest of
// the body is read so the connection is reused.
func ttfb(ctx context.Context, url string, size int64) (time.Duration, error) {
	start, first, err := ttfbAt(ctx, url, size)
	return first.Sub(start), err
}

// ttfbAt is ttfb that says when the request started and when its first
// byte came (wall clock and monotonic).
func ttfbAt(ctx context.Context, url string, size int64) (start, first time.Time, err error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return start, first, err
	}
	start = time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return start, first, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return start, first, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	var one [1]byte
	if _, err := io.ReadFull(resp.Body, one[:]); err != nil {
		return start, first, err
	}
	first = time.Now()
	n, err := io.CopyBuffer(discard, resp.Body, make([]byte, 256<<10))
	if err != nil || n+1 != size {
		return start, first, fmt.Errorf("GET %s: %d bytes, %v", url, n+1, err)
	}
	return start, first, nil
}

// writeBlob writes size random bytes under root at the registry storage
// path of their digest and returns the digest's hex and that path.
func writeBlob(root string, size int64) (string, string, error) {
	tmp, err := os.CreateTemp(root, ".blob-")
	if err != nil {
		return "", "", err
	}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for left := size; left > 0; {
		n := min(int64(len(buf)), left)
		rand.Read(buf[:n])
		h.Write(buf[:n])
		if _, err := tmp.Write(buf[:n]); err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
			return "", "", err
		}
		left -= n
	}
	if err := tmp.Close(); err != nil {
		return "", "", err
	}
	hexd := hex.EncodeToString(h.Sum(nil))
	rel := blobPath(hexd)
	if err := os.MkdirAll(filepath.Join(root, filepath.Dir(rel)), 0o755); err != nil {
		return "", "", err
	}
	if err := os.Rename(tmp.Name(), filepath.Join(root, rel)); err != nil {
		return "", "", err
	}
	return hexd, rel, nil
}

// cacheFile is where a node's cache keeps a blob's bytes.
func cacheFile(n *node, hexd string) string {
	return filepath.Join(n.DataDir, "cache", "blobs", "sha256", hexd, "data")
}

// discard hides io.Discard's ReadFrom, which reads 8 KiB at a time whatever
// buffer io.CopyBuffer is given: the reads measured are the buffer's size.
var discard = struct{ io.Writer }{io.Discard}
