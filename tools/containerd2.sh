#!/usr/bin/env bash
# Builds containerd 2.x, ctr and the runc shim (containerd-shim-runc-v2, for
# itest/cri_test.go, which runs containers) from containerd's Go module (the version go.mod
# pins, or $CONTAINERD_VERSION) into $TOOLS_CACHE/containerd-<version>/ and
# prints that folder. Debian ships only containerd 1.6; the integration tests
# need a 2.x daemon too. A build that already exists is reused.
#
# Static (CGO_ENABLED=0) and without the storage drivers that need C headers.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
GO="${GO:-go}"
version="${CONTAINERD_VERSION:-$(awk '$1 == "github.com/containerd/containerd/v2" {print $2; exit}' "$repo/go.mod")}"
if [ -z "$version" ]; then
  echo "containerd2.sh: no containerd/v2 version in go.mod; set CONTAINERD_VERSION" >&2
  exit 1
fi
cache="${TOOLS_CACHE:-$HOME/.cache/peerd-tools}"
out="$cache/containerd-$version"
if [ -x "$out/containerd" ] && [ -x "$out/ctr" ] && [ -x "$out/containerd-shim-runc-v2" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache"
# A throwaway module outside the repository, so building containerd never
# touches peerd's go.mod/go.sum.
work="$(mktemp -d "${TMPDIR:-/tmp}/containerd2-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"
"$GO" mod init peerd.invalid/containerd2-build >/dev/null 2>&1
"$GO" get "github.com/containerd/containerd/v2@$version" >&2
tmpout="$work/bin"
mkdir -p "$tmpout"
for cmd in containerd ctr containerd-shim-runc-v2; do
  echo "containerd2.sh: building $cmd $version" >&2
  CGO_ENABLED=0 "$GO" build -trimpath -mod=mod \
    -tags 'no_btrfs no_devmapper no_zfs no_aufs' \
    -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$version" \
    -o "$tmpout/$cmd" "github.com/containerd/containerd/v2/cmd/$cmd"
done
# Publish atomically so a concurrent or interrupted run never leaves half a folder.
rm -rf "$out.tmp.$$"
mv "$tmpout" "$out.tmp.$$"
if ! mv -T "$out.tmp.$$" "$out" 2>/dev/null; then
  # A folder from an older build (or a concurrent run): add what it lacks,
  # each file renamed into place whole.
  for cmd in containerd ctr containerd-shim-runc-v2; do
    [ -x "$out/$cmd" ] || mv "$out.tmp.$$/$cmd" "$out/$cmd"
  done
  rm -rf "$out.tmp.$$"
fi
echo "$out"
