package main

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
)

// TestTogetherReportsTheFirstError checks that every reader runs and that
// a failing one cancels the rest and is what together returns, not the
// cancellations it caused.
func TestTogetherReportsTheFirstError(t *testing.T) {
	var calls atomic.Int32
	if _, err := together(context.Background(), 4, 1<<20, func(ctx context.Context, i int) error {
		calls.Add(1)
		return nil
	}); err != nil || calls.Load() != 4 {
		t.Fatalf("all succeed: %v after %d calls, want nil after 4", err, calls.Load())
	}
	failure := errors.New("reader 2 failed")
	_, err := together(context.Background(), 4, 1<<20, func(ctx context.Context, i int) error {
		if i == 2 {
			return failure
		}
		<-ctx.Done() // the others wait until the failure cancels them
		return ctx.Err()
	})
	if err != failure {
		t.Errorf("got %v, want %v", err, failure)
	}
}
