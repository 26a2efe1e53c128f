package p2p

import (
	"testing"

	"github.com/libp2p/go-libp2p"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
)

// The connection manager must trim before the resource manager refuses:
// a high mark at or above the inbound limit leaves a well-known node full
// of inbound connections and refusing every new peer.
func TestConnWatermarksStayBelowInboundLimit(t *testing.T) {
	limits := rcmgr.DefaultLimits
	libp2p.SetDefaultServiceLimits(&limits)
	for _, gib := range []int64{1, 2, 4, 8, 24, 64, 256} {
		scaled := limits.Scale(gib<<30/8, 10000) // AutoScale gives libp2p 1/8 of memory
		in := int(scaled.ToPartialLimitConfig().System.ConnsInbound)
		low, high := connWatermarks(scaled)
		if high >= in || high > 400 || low >= high || low <= 0 {
			t.Errorf("%d GiB: inbound limit %d, watermarks %d/%d: want 0 < low < high < inbound limit, high ≤ 400", gib, in, low, high)
		}
	}
	low, high := connWatermarks(rcmgr.InfiniteLimits)
	if low != 200 || high != 400 {
		t.Errorf("unlimited inbound: watermarks %d/%d, want 200/400", low, high)
	}
}
