package web

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"unicode"
)

// startMeasure applies the rules of a measurement request: same origin,
// one at a time. It returns the func that ends the turn, or nil with the
// status and reason of the refusal.
func (h *handler) startMeasure(r *http.Request) (release func(), code int, reason string) {
	if err := h.cop.Check(r); err != nil {
		return nil, http.StatusForbidden, "cross-origin request refused: a measurement starts only from this page (" + err.Error() + ")"
	}
	select {
	case h.measuring <- struct{}{}:
		return func() { <-h.measuring }, 0, ""
	default:
		return nil, http.StatusConflict, ErrBusy.Error() + "; try again when it ends"
	}
}

// validRef refuses what cannot be an image reference or digest.
func validRef(ref string) error {
	if ref == "" {
		return errors.New("no reference: want registry/repository:tag, …@sha256:<hex>")
	}
	if len(ref) > 512 {
		return errors.New("reference longer than 512 bytes")
	}
	if strings.ContainsFunc(ref, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) {
		return errors.New("reference with spaces or control characters")
	}
	return nil
}

// runMeasure runs one measurement under the timeout; the int is the status.
func (h *handler) runMeasure(ctx context.Context, ref string) (Measurement, int) {
	ctx, cancel := context.WithTimeout(ctx, h.o.MeasureTimeout)
	defer cancel()
	m, err := h.p.Measure(ctx, ref)
	m.Ref = Redact(ref)
	for i := range m.Layers {
		m.Layers[i].Error = RedactText(m.Layers[i].Error)
	}
	switch {
	case err == nil:
		return m, http.StatusOK
	case errors.Is(err, ErrBusy):
		m.Error = ErrBusy.Error()
		return m, http.StatusConflict
	case errors.Is(err, context.DeadlineExceeded):
		m.Error = RedactText(fmt.Sprintf("timed out after %s: %v", Duration(h.o.MeasureTimeout), err))
		return m, http.StatusGatewayTimeout
	default:
		m.Error = RedactText(err.Error())
		return m, http.StatusBadGateway
	}
}

// MeasureRequest is the body of POST /debug/api/measure.
type MeasureRequest struct {
	Ref string `json:"ref"`
}

func (h *handler) serveAPIMeasure(w http.ResponseWriter, r *http.Request) {
	// A JSON body needs a preflight from another site, a second wall
	// behind the origin check.
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
		apiError(w, http.StatusUnsupportedMediaType, "want Content-Type: application/json with {\"ref\": \"…\"}")
		return
	}
	release, code, reason := h.startMeasure(r)
	if release == nil {
		apiError(w, code, reason)
		return
	}
	defer release()
	var req MeasureRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, 4096))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		apiError(w, http.StatusBadRequest, "bad JSON body: "+err.Error())
		return
	}
	if err := validRef(req.Ref); err != nil {
		apiError(w, http.StatusBadRequest, err.Error())
		return
	}
	m, code := h.runMeasure(r.Context(), req.Ref)
	writeJSON(w, r, code, m)
}
