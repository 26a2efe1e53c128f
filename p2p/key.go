package p2p

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
)

// KeyFile is the node's identity key inside the data dir.
const KeyFile = "identity.key"

// LoadOrCreateKey reads the node's libp2p identity from dir/identity.key,
// creating an Ed25519 key (mode 0600) when the file does not exist. A key
// file readable by others is refused: the key is the node's cluster identity.
func LoadOrCreateKey(dir string) (crypto.PrivKey, error) {
	path := filepath.Join(dir, KeyFile)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		st, err := os.Stat(path)
		if err != nil {
			return nil, err
		}
		if st.Mode().Perm()&0o077 != 0 {
			return nil, fmt.Errorf("identity key %s has mode %v: want 0600 (chmod 600 it)", path, st.Mode().Perm())
		}
		k, err := crypto.UnmarshalPrivateKey(b)
		if err != nil {
			return nil, fmt.Errorf("identity key %s: %w", path, err)
		}
		return k, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("read identity key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		return nil, err
	}
	raw, err := crypto.MarshalPrivateKey(k)
	if err != nil {
		return nil, err
	}
	// Write then rename so a crash never leaves a truncated key behind, and
	// O_EXCL on the final name would race with a concurrent `peerd id`.
	tmp, err := os.CreateTemp(dir, ".identity-*")
	if err != nil {
		return nil, fmt.Errorf("write identity key: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, err
	}
	if _, err := tmp.Write(raw); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("write identity key: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, err
	}
	if err := tmp.Close(); err != nil {
		return nil, err
	}
	// Link fails if another process created the key meanwhile: use theirs.
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return LoadOrCreateKey(dir)
		}
		return nil, fmt.Errorf("write identity key: %w", err)
	}
	return k, nil
}

// PeerIDFromDir returns the peer ID of the key in dir, creating the key if absent.
func PeerIDFromDir(dir string) (peer.ID, error) {
	k, err := LoadOrCreateKey(dir)
	if err != nil {
		return "", err
	}
	return peer.IDFromPrivateKey(k)
}

// LoadSwarmKey reads a libp2p private-network key file
// (/key/swarm/psk/1.0.0/, /base16/ and 64 hex characters).
func LoadSwarmKey(path string) (pnet.PSK, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read swarm key: %w", err)
	}
	psk, err := pnet.DecodeV1PSK(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("swarm key %s: %w", path, err)
	}
	if len(psk) != 32 {
		return nil, fmt.Errorf("swarm key %s: %d bytes, want 32", path, len(psk))
	}
	return psk, nil
}
