package p2p

import (
	"context"
	"errors"
	"fmt"
	"path"
	"strings"
	"sync"

	ds "github.com/ipfs/go-datastore"
	dsq "github.com/ipfs/go-datastore/query"
)

// maxProviderRecords bounds the provider records a node stores for the
// DHT (about 200 bytes each). A cluster where every node holds every one of
// 5,000 blobs stores 100,000 per node (blobs x holders x 20 replicas
// / nodes); past the bound new records are refused and the DHT's provider
// manager retries, then drops them, until expired ones make room.
const maxProviderRecords = 1 << 19

// errRecordsFull is returned by Put when the store holds its maximum.
var errRecordsFull = errors.New("provider record store full")

// recordStore is the in-memory datastore behind the DHT's provider records,
// indexed by key path. The DHT's provider manager reads a blob's providers
// with a prefix query (/providers/<blob>); over a flat map datastore each
// such query copies and filters every record the node stores, and a query
// for a blob the node holds no record of (most requests on a lookup's path)
// is never cached. Here a prefix query walks only the entries under that
// prefix. It is safe for concurrent use.
type recordStore struct {
	mu    sync.RWMutex
	root  *dirNode
	n     int
	max   int
	count func(n int) // reports the number of records after a change (may be nil)
	full  func()      // reports a record refused for want of room (may be nil)
}

// dirNode holds the entries whose parent is one key path, and the paths
// below it.
type dirNode struct {
	vals map[string][]byte   // full key -> value
	kids map[string]*dirNode // child name -> node
}

func newRecordStore(max int, count func(int), full func()) *recordStore {
	return &recordStore{root: &dirNode{}, max: max, count: count, full: full}
}

var _ ds.Batching = (*recordStore)(nil)

// walk returns the node of directory dir (a cleaned key path, "/" for the
// root), creating it when create is set; nil when absent.
func (s *recordStore) walk(dir string, create bool) *dirNode {
	n := s.root
	if dir == "/" {
		return n
	}
	for _, name := range strings.Split(dir[1:], "/") {
		next := n.kids[name]
		if next == nil {
			if !create {
				return nil
			}
			if n.kids == nil {
				n.kids = map[string]*dirNode{}
			}
			next = &dirNode{}
			n.kids[name] = next
		}
		n = next
	}
	return n
}

func (s *recordStore) Put(_ context.Context, key ds.Key, value []byte) error {
	k := key.String()
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.walk(key.Parent().String(), true)
	if _, ok := n.vals[k]; !ok {
		if s.n >= s.max {
			s.prune(key.Parent().String())
			if s.full != nil {
				s.full()
			}
			return fmt.Errorf("%w (%d records)", errRecordsFull, s.n)
		}
		s.n++
		if s.count != nil {
			s.count(s.n)
		}
	}
	if n.vals == nil {
		n.vals = map[string][]byte{}
	}
	n.vals[k] = append([]byte(nil), value...)
	return nil
}

func (s *recordStore) Get(_ context.Context, key ds.Key) ([]byte, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if n := s.walk(key.Parent().String(), false); n != nil {
		if v, ok := n.vals[key.String()]; ok {
			return append([]byte(nil), v...), nil
		}
	}
	return nil, ds.ErrNotFound
}

func (s *recordStore) Has(ctx context.Context, key ds.Key) (bool, error) {
	_, err := s.GetSize(ctx, key)
	if errors.Is(err, ds.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

func (s *recordStore) GetSize(_ context.Context, key ds.Key) (int, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if n := s.walk(key.Parent().String(), false); n != nil {
		if v, ok := n.vals[key.String()]; ok {
			return len(v), nil
		}
	}
	return -1, ds.ErrNotFound
}

func (s *recordStore) Delete(_ context.Context, key ds.Key) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	dir := key.Parent().String()
	n := s.walk(dir, false)
	if n == nil {
		return nil
	}
	if _, ok := n.vals[key.String()]; ok {
		delete(n.vals, key.String())
		s.n--
		if s.count != nil {
			s.count(s.n)
		}
	}
	s.prune(dir)
	return nil
}

// prune removes the empty nodes on the path to dir, deepest first.
func (s *recordStore) prune(dir string) {
	if dir == "/" {
		return
	}
	names := strings.Split(dir[1:], "/")
	chain := []*dirNode{s.root}
	for _, name := range names {
		next := chain[len(chain)-1].kids[name]
		if next == nil {
			return
		}
		chain = append(chain, next)
	}
	for i := len(names) - 1; i >= 0; i-- {
		n := chain[i+1]
		if len(n.vals) > 0 || len(n.kids) > 0 {
			return
		}
		delete(chain[i].kids, names[i])
	}
}

// Query answers a prefix query from the entries under the prefix alone;
// filters, orders, offset and limit apply to those as usual.
func (s *recordStore) Query(_ context.Context, q dsq.Query) (dsq.Results, error) {
	prefix := "/"
	if q.Prefix != "" {
		prefix = path.Clean("/" + strings.TrimPrefix(q.Prefix, "/"))
	}
	var entries []dsq.Entry
	s.mu.RLock()
	if n := s.walk(prefix, false); n != nil {
		var collect func(n *dirNode)
		collect = func(n *dirNode) {
			for k, v := range n.vals {
				e := dsq.Entry{Key: k, Size: len(v)}
				if !q.KeysOnly {
					e.Value = append([]byte(nil), v...)
				}
				entries = append(entries, e)
			}
			for _, kid := range n.kids {
				collect(kid)
			}
		}
		collect(n)
	}
	s.mu.RUnlock()
	rest := q
	rest.Prefix = ""
	return dsq.NaiveQueryApply(rest, dsq.ResultsWithEntries(q, entries)), nil
}

func (s *recordStore) Sync(context.Context, ds.Key) error { return nil }

func (s *recordStore) Batch(context.Context) (ds.Batch, error) { return ds.NewBasicBatch(s), nil }

func (s *recordStore) Close() error { return nil }
