#!/usr/bin/env bash
# Builds the test tools the Kubernetes tests need — kube-apiserver (from
# k8s.io/kubernetes) and helm (from helm.sh/helm/v3) — into
#   ${TOOLS_CACHE:-$HOME/.cache/peerd-tools}/k8s-<kubernetes>-helm-<helm>-r<rev>/
# and prints that folder. A folder that already holds both binaries is reused.
# A cold build takes several minutes; the Go build cache makes later ones fast.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

modver() { awk -v m="$1" '$1 == m && $2 ~ /^v/ { print $2; exit }' go.mod; }
kube="$(modver k8s.io/kubernetes)"
helm="$(modver helm.sh/helm/v3)"
[ -n "$kube" ] && [ -n "$helm" ] || { echo "build.sh: cannot read versions from go.mod" >&2; exit 1; }

cache="${TOOLS_CACHE:-$HOME/.cache/peerd-tools}"
# Bump rev when the recipe below changes, so stale builds are not reused.
rev=2
dir="$cache/k8s-${kube#v}-helm-${helm#v}-r$rev"
if [ -x "$dir/kube-apiserver" ] && [ -x "$dir/helm" ]; then
  echo "$dir"
  exit 0
fi

mkdir -p "$cache"
# Stamp the real version: the apiserver derives its emulation version and /version from it.
minor="${kube#v1.}"; minor="${minor%%.*}"
ver="-X k8s.io/component-base/version.gitVersion=$kube -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
ver="$ver -X k8s.io/client-go/pkg/version.gitVersion=$kube -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
# helm renders and lints for the Kubernetes version it is built against (else 1.20).
ver="$ver -X helm.sh/helm/v3/internal/version.version=$helm"
for pkg in pkg/chartutil pkg/lint/rules; do
  ver="$ver -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$minor"
done
tmp="$(mktemp -d "$cache/.k8s-build.XXXXXX")"
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "build.sh: building kube-apiserver $kube and helm $helm (cold: several minutes)" >&2
# GOWORK=off: a go.work above this folder must not pull peerd into the build.
GOWORK=off CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=mod -trimpath" \
  nice go build -ldflags "-s -w $ver" -o "$tmp/" k8s.io/kubernetes/cmd/kube-apiserver helm.sh/helm/v3/cmd/helm
"$tmp/kube-apiserver" --version >&2
"$tmp/helm" version --short >&2
# Publish atomically so a concurrent or interrupted build never leaves half a folder.
if ! mv -T "$tmp" "$dir" 2>/dev/null; then
  [ -x "$dir/kube-apiserver" ] && [ -x "$dir/helm" ] || { echo "build.sh: cannot publish $dir" >&2; exit 1; }
fi
trap - EXIT
echo "$dir"
