package e2e

import "testing"

// The large preset must fit a machine with ~60 GiB free: with native
// snapshots (each a copy of its parents) 8 nodes holding a 1 GiB image in 8
// layers do not. This runs without root or a cluster.
func TestLargePresetFitsDisk(t *testing.T) {
	t.Setenv("E2E_SIZE", "large")
	for _, k := range []string{"E2E_NODES", "E2E_IMAGE_SIZE", "E2E_LAYERS", "E2E_SNAPSHOTTER"} {
		t.Setenv(k, "")
	}
	cfg, err := loadConfig()
	if err != nil {
		t.Fatal(err)
	}
	if need := diskNeed(cfg); need > 60<<30 {
		t.Errorf("E2E_SIZE=large (%s snapshotter) needs %s of disk; want at most 60 GiB", cfg.Snapshotter, human(need))
	}
	native := cfg
	native.Snapshotter = "native"
	if diskNeed(native) <= diskNeed(cfg) {
		t.Errorf("native snapshots need %s, overlayfs %s: native copies parents, so it must need more", human(diskNeed(native)), human(diskNeed(cfg)))
	}
}

// The default preset keeps the native snapshotter, and its containerd part
// of diskNeed is the 1.37 GiB the default run measured at its peak (4 nodes
// × 100 MiB: content plus snapshots of 1, 2, 3 and 4 layers).
func TestDefaultPresetDisk(t *testing.T) {
	for _, k := range []string{"E2E_SIZE", "E2E_NODES", "E2E_IMAGE_SIZE", "E2E_LAYERS", "E2E_SNAPSHOTTER"} {
		t.Setenv(k, "")
	}
	cfg, err := loadConfig()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Snapshotter != "native" {
		t.Errorf("default snapshotter %q, want native", cfg.Snapshotter)
	}
	ctrd := diskNeed(cfg) - int64(cfg.Nodes)*peerdCacheSize(cfg) - 2*cfg.ImageSize
	if ctrd != 4*350<<20 {
		t.Errorf("containerd part %s, want 1.37 GiB", human(ctrd))
	}
	t.Setenv("E2E_SNAPSHOTTER", "btrfs")
	if _, err := loadConfig(); err == nil {
		t.Error("E2E_SNAPSHOTTER=btrfs accepted; want native or overlayfs only")
	}
}
