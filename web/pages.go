package web

import (
	"bytes"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/peerd-project/peerd/transfer"
)

var funcs = template.FuncMap{
	"size":   Size,
	"dur":    Duration,
	"speed":  Speed,
	"short":  Short,
	"redact": Redact,
	"join":   strings.Join,
	"pct": func(part, whole int64) string {
		if whole <= 0 {
			return "-"
		}
		return strconv.FormatFloat(100*float64(part)/float64(whole), 'f', 0, 64) + "%"
	},
	// bar is a transfer's bytes by source as the widths, in percent, of a
	// stacked bar: cache, containerd, peers, origin.
	"bar": func(b transfer.Bytes) []barPart {
		t := b.Total()
		if t <= 0 {
			return nil
		}
		var out []barPart
		x := 0.0
		for _, p := range []struct {
			class string
			n     int64
		}{{"cache", b.Cache}, {"containerd", b.Containerd}, {"peers", b.Peers}, {"origin", b.Origin}} {
			if p.n <= 0 {
				continue
			}
			w := 100 * float64(p.n) / float64(t)
			out = append(out, barPart{Class: p.class, X: fmt.Sprintf("%.2f", x), W: fmt.Sprintf("%.2f", w)})
			x += w
		}
		return out
	},
}

type barPart struct{ Class, X, W string }

// view is what every page's layout reads.
type view struct {
	Title     string
	Now       time.Time
	RefreshMS int64 // 0: the page does not refresh itself
	Node      Node
}

func (v view) Ago(t time.Time) string { return Ago(v.Now, t) }
func (v view) Uptime() string {
	if v.Node.Started.IsZero() {
		return "-"
	}
	return Duration(v.Now.Sub(v.Node.Started).Truncate(time.Second))
}
func (v view) Clock(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format("15:04:05")
}
func (v view) Stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format("2006-01-02 15:04:05 UTC")
}

type indexView struct {
	view
	S         Snapshot
	Peers     Page[Peer]
	Connected int
	Blobs     BlobPage
	Transfers Page[transfer.Record]
	Recent    transfer.Bytes // bytes by source over the listed pulls
	q         url.Values
}

// link is the page's own URL with params set (or deleted when "").
func (v indexView) link(anchor string, kv ...string) string {
	q := url.Values{}
	for k, vs := range v.q {
		q[k] = vs
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == "" {
			q.Del(kv[i])
		} else {
			q.Set(kv[i], kv[i+1])
		}
	}
	s := Prefix
	if e := q.Encode(); e != "" {
		s += "?" + e
	}
	return s + "#" + anchor
}

// SortLink orders the blobs by key, flipping the order when they already are.
func (v indexView) SortLink(key string) string {
	order := sortKeys[key]
	if v.Blobs.Sort == key {
		order = map[string]string{"asc": "desc", "desc": "asc"}[v.Blobs.Order]
	}
	return v.link("blobs", "sort", key, "order", order, "page", "")
}

// SortMark is the arrow of the column the blobs are ordered by.
func (v indexView) SortMark(key string) string {
	if v.Blobs.Sort != key {
		return ""
	}
	if v.Blobs.Order == "asc" {
		return "▲"
	}
	return "▼"
}

func (v indexView) PageLink(param, anchor string, n int) string {
	p := ""
	if n > 1 {
		p = strconv.Itoa(n)
	}
	return v.link(anchor, param, p)
}

func (h *handler) serveIndex(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	s := h.snapshot()
	blobs, code, err := h.blobPage(q)
	if err != nil {
		http.Error(w, fmt.Sprintf("%d %v", code, err), code)
		return
	}
	peers := slices.Clone(s.Peers)
	slices.SortStableFunc(peers, func(a, b Peer) int {
		if a.Connected != b.Connected {
			if a.Connected {
				return -1
			}
			return 1
		}
		return strings.Compare(a.ID, b.ID)
	})
	connected := 0
	for _, p := range peers {
		if p.Connected {
			connected++
		}
	}
	pp, err := pageOf(peers, q, "ppage", h.o.PageSize)
	if err != nil {
		http.Error(w, "400 "+err.Error(), http.StatusBadRequest)
		return
	}
	tp, err := pageOf(s.Transfers, q, "tpage", h.o.PageSize)
	if err != nil {
		http.Error(w, "400 "+err.Error(), http.StatusBadRequest)
		return
	}
	var recent transfer.Bytes
	for _, t := range tp.Items {
		// What this node served to peers says nothing of where its own
		// pulls came from.
		if t.Face != transfer.FacePeer {
			recent.Add(t.Bytes)
		}
	}
	v := indexView{
		view: view{Title: "peerd " + Short(s.Node.PeerID, 16), Now: h.o.Now(), RefreshMS: h.o.Refresh.Milliseconds(), Node: s.Node},
		S:    s, Peers: pp, Connected: connected, Blobs: blobs, Transfers: tp, Recent: recent, q: q,
	}
	h.render(w, r, h.index, http.StatusOK, v)
}

type blobView struct {
	view
	B      BlobDetail
	Cells  []cell
	Per    int // chunks per cell
	Counts map[string]int
}

// cell is one square of the chunk map: a state and its tooltip.
type cell struct {
	Class string
	Title string
}

// maxCells bounds the chunk map; larger blobs fold several chunks into a
// cell, shown in its weakest state.
const maxCells = 4096

func chunkCells(d BlobDetail) ([]cell, int, map[string]int) {
	counts := map[string]int{"verified": 0, "unverified": 0, "absent": 0}
	n := len(d.Chunks)
	per := max(1, (n+maxCells-1)/maxCells)
	rank := func(c byte) int {
		switch c {
		case 'v':
			return 2
		case 'p':
			return 1
		}
		return 0
	}
	class := [...]string{"absent", "unverified", "verified"}
	for i := 0; i < n; i++ {
		counts[class[rank(d.Chunks[i])]]++
	}
	cells := make([]cell, 0, (n+per-1)/per)
	for lo := 0; lo < n; lo += per {
		hi := min(lo+per, n)
		worst := 2
		for i := lo; i < hi; i++ {
			worst = min(worst, rank(d.Chunks[i]))
		}
		title := fmt.Sprintf("chunk %d: %s", lo, class[worst])
		if hi-lo > 1 {
			title = fmt.Sprintf("chunks %d–%d: %s", lo, hi-1, class[worst])
		}
		if d.ChunkSize > 0 {
			title += fmt.Sprintf(" (from %s)", Size(int64(lo)*d.ChunkSize))
		}
		cells = append(cells, cell{Class: class[worst], Title: title})
	}
	return cells, per, counts
}

func (h *handler) serveBlob(w http.ResponseWriter, r *http.Request, key string) {
	if err := validKey(key); err != nil {
		http.Error(w, "400 "+err.Error(), http.StatusBadRequest)
		return
	}
	d, ok := h.p.Blob(key)
	if !ok {
		http.Error(w, "404 this node holds no part of blob "+strconv.Quote(key), http.StatusNotFound)
		return
	}
	d.Key = Redact(d.Key)
	cells, per, counts := chunkCells(d)
	s := h.p.Snapshot()
	v := blobView{
		view: view{Title: "blob " + Short(d.Key, 24), Now: h.o.Now(), RefreshMS: h.o.Refresh.Milliseconds(), Node: s.Node},
		B:    d, Cells: cells, Per: per, Counts: counts,
	}
	h.render(w, r, h.blob, http.StatusOK, v)
}

type measureView struct {
	view
	M Measurement
}

func (h *handler) serveMeasure(w http.ResponseWriter, r *http.Request) {
	node := h.p.Snapshot().Node
	v := measureView{view: view{Title: "measure", Now: h.o.Now(), Node: node}}
	release, code, reason := h.startMeasure(r)
	if release == nil {
		v.M.Error = reason
		h.render(w, r, h.measure, code, v)
		return
	}
	defer release()
	r.Body = http.MaxBytesReader(w, r.Body, 4096)
	ref := strings.TrimSpace(r.PostFormValue("ref"))
	if err := validRef(ref); err != nil {
		v.M = Measurement{Ref: ref, Error: err.Error()}
		h.render(w, r, h.measure, http.StatusBadRequest, v)
		return
	}
	v.M, code = h.runMeasure(r.Context(), ref)
	h.render(w, r, h.measure, code, v)
}

// render executes t into a buffer first, so a template error is a clean 500
// instead of half a page.
func (h *handler) render(w http.ResponseWriter, r *http.Request, t *template.Template, code int, data any) {
	var b bytes.Buffer
	if err := t.ExecuteTemplate(&b, "layout", data); err != nil {
		http.Error(w, "500 rendering the page: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(b.Len()))
	w.WriteHeader(code)
	if r.Method != http.MethodHead {
		w.Write(b.Bytes())
	}
}

// pagerView is a list's page links.
type pagerView struct {
	Page, Pages, Prev, Next int
	v                       indexView
	param, anchor           string
}

func (p pagerView) Link(n int) string { return p.v.PageLink(p.param, p.anchor, n) }

func init() {
	funcs["pager"] = func(v indexView, page, pages int, param, anchor string) pagerView {
		return pagerView{Page: page, Pages: pages, Prev: page - 1, Next: page + 1, v: v, param: param, anchor: anchor}
	}
}
