#!/usr/bin/env bash
# Sets up what `make test` needs on a Debian machine, so no test is skipped
# for a missing piece. `make test` runs it first; .ci/run runs it through
# `make test`.
#
# As root: installs the Debian packages the tests use (apt-get update only
# when one is missing), stops Debian's packaged services that would hold the
# ports and sockets the tests use, and loads the fuse module.
# As any user: builds the cached test tools (containerd 2.x, kube-apiserver
# and helm) into $TOOLS_CACHE.
# Not root: says which tests will be skipped and why, and goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

# package: what needs it
packages=(
  "fuse3:fusermount3 for the FUSE mounts (fusefs, itest)"
  "containerd:containerd 1.x for itest TestContainerdMirror, TestContainerdTagsFromPeers and e2e"
  "runc:containerd's runtime"
  "docker-registry:the registry of the containerd tests and e2e"
  "etcd-server:etcd under kube-apiserver (itest TestK8s*, TestHelmChart, TestHelmUninstallHookWait)"
  "iproute2:ip and tc for e2e's network namespaces"
  "util-linux:nsenter for e2e, losetup for itest TestPowerCutMidFill"
  "e2fsprogs:mkfs.ext4 for itest TestPowerCutMidFill"
  "nftables:nft for e2e TestChaos (packet loss, partitions)"
  "chromium:the headless browser of the debug page's tests (web, internal/browser)"
  "skopeo:a containers/image client (as CRI-O and Podman) for itest TestRegistriesConfWithARealClient"
  "podman:the Podman nodes of e2e TestPodman"
  "make:the build"
  "git:the version stamp"
)
missing=()
for entry in "${packages[@]}"; do
  pkg="${entry%%:*}"
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done

if [ "$(id -u)" = 0 ]; then
  if [ ${#missing[@]} -gt 0 ]; then
    echo "test-setup: installing ${missing[*]}" >&2
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
  fi
  # Debian's packaged services must not hold the ports or sockets the tests use.
  systemctl stop docker-registry containerd etcd 2>/dev/null || true
  modprobe fuse 2>/dev/null || true
else
  echo "test-setup: not root, so nothing is installed and these tests will be skipped:" >&2
  echo "  - containerd (itest TestContainerdMirror, TestContainerdTagsFromPeers): containerd needs root" >&2
  if [ ! -w /dev/fuse ]; then
    echo "  - FUSE (fusefs, itest TestFUSE*): /dev/fuse is not usable by $(id -un)" >&2
  fi
  for entry in "${packages[@]}"; do
    pkg="${entry%%:*}"
    if [[ " ${missing[*]} " == *" $pkg "* ]]; then
      echo "  - package $pkg is not installed: ${entry#*:}" >&2
    fi
  done
  echo "  Run make test as root (CI does) to install them." >&2
fi

# The cached tools are built as any user: a cold build takes minutes, later runs reuse it.
bash tools/containerd2.sh >/dev/null  # containerd 2.x for itest/containerd_test.go, itest/tags_test.go
bash tools/k8s/build.sh >/dev/null  # kube-apiserver + helm for itest/k8s_test.go, itest/helm_test.go
