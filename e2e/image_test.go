package e2e

import (
	"archive/tar"
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"time"
)

// randReader is a fast, seeded stream of incompressible bytes.
func randReader(seed uint64) io.Reader {
	var s [32]byte
	binary.LittleEndian.PutUint64(s[:], seed)
	binary.LittleEndian.PutUint64(s[8:], ^seed)
	return rand.NewChaCha8(s)
}

type descriptor struct {
	MediaType string `json:"mediaType"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
}

// generateImage writes an OCI image of `layers` uncompressed tar layers of
// about total/layers bytes each, every one holding a single file of random
// bytes (containerd unpacks them, so they must be real tars; random bytes
// so nothing compresses away). Layout: dir/blobs/sha256/<hex>, dir/manifest.json.
func generateImage(dir string, total int64, layers int, seed uint64) (image, error) {
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return image{}, err
	}
	var im image
	var descs []descriptor
	var diffIDs []string
	per := total / int64(layers)
	for i := range layers {
		// A tar of one file: 512-byte header, the data padded to 512, two zero blocks.
		fileSize := max(per-3*512, 1)
		d, err := writeBlob(blobs, func(w io.Writer) error {
			tw := tar.NewWriter(w)
			hdr := &tar.Header{Name: fmt.Sprintf("e2e/layer-%d.bin", i), Mode: 0o644, Size: fileSize,
				ModTime: time.Unix(1700000000, 0), Typeflag: tar.TypeReg, Format: tar.FormatPAX}
			if err := tw.WriteHeader(hdr); err != nil {
				return err
			}
			if _, err := io.CopyN(tw, randReader(seed*1000+uint64(i)), fileSize); err != nil {
				return err
			}
			return tw.Close()
		})
		if err != nil {
			return image{}, err
		}
		d.MediaType = "application/vnd.oci.image.layer.v1.tar"
		descs = append(descs, d)
		// Uncompressed layers: the diff ID is the layer's own digest.
		diffIDs = append(diffIDs, d.Digest)
		im.layers = append(im.layers, d.Digest)
		im.layerLen = append(im.layerLen, d.Size)
		im.size += d.Size
	}
	cfg, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       map[string]any{"Cmd": []string{"/bin/true"}},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": diffIDs},
		"history":      []map[string]any{{"created_by": "peerd e2e", "comment": fmt.Sprintf("seed %d", seed)}},
	})
	if err != nil {
		return image{}, err
	}
	cd, err := writeBlob(blobs, func(w io.Writer) error { _, err := w.Write(cfg); return err })
	if err != nil {
		return image{}, err
	}
	cd.MediaType = "application/vnd.oci.image.config.v1+json"
	man, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        cd,
		"layers":        descs,
	})
	if err != nil {
		return image{}, err
	}
	if err := os.WriteFile(filepath.Join(dir, "manifest.json"), man, 0o644); err != nil {
		return image{}, err
	}
	sum := sha256.Sum256(man)
	im.digest = "sha256:" + hex.EncodeToString(sum[:])
	im.size += cd.Size + int64(len(man))
	return im, nil
}

// writeBlob writes what fill produces to a temp file, hashing as it goes,
// and renames it to its digest.
func writeBlob(dir string, fill func(io.Writer) error) (descriptor, error) {
	f, err := os.CreateTemp(dir, ".tmp-")
	if err != nil {
		return descriptor{}, err
	}
	defer os.Remove(f.Name())
	h := sha256.New()
	cw := &countWriter{h: h}
	bw := bufio.NewWriterSize(io.MultiWriter(f, cw), 1<<20)
	if err := fill(bw); err != nil {
		f.Close()
		return descriptor{}, err
	}
	if err := bw.Flush(); err != nil {
		f.Close()
		return descriptor{}, err
	}
	if err := f.Close(); err != nil {
		return descriptor{}, err
	}
	hexd := hex.EncodeToString(h.Sum(nil))
	if err := os.Rename(f.Name(), filepath.Join(dir, hexd)); err != nil {
		return descriptor{}, err
	}
	return descriptor{Digest: "sha256:" + hexd, Size: cw.n}, nil
}

type countWriter struct {
	h hash.Hash
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	return c.h.Write(p)
}

// writeRandomFile writes size random bytes to name and returns their sha256 hex.
func writeRandomFile(name string, size int64, seed uint64) (string, error) {
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		return "", err
	}
	f, err := os.Create(name)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	bw := bufio.NewWriterSize(io.MultiWriter(f, h), 1<<20)
	if _, err := io.CopyN(bw, randReader(seed), size); err != nil {
		f.Close()
		return "", err
	}
	if err := bw.Flush(); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
