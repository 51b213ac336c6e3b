#!/usr/bin/env bash
# Prepare a real control plane and node for keymount's end-to-end tests.
#
# Builds kube-apiserver, kubelet and kube-controller-manager 1.20.2 from Debian's `kubernetes` source package, with the
# vendored github.com/modern-go/reflect2 v1.0.1 replaced by Debian's 1.0.2 (v1.0.1
# segfaults under Go >= 1.18 at the first mutating webhook JSONPatch response), and
# installs them with etcd 3.4 (Debian's etcd-server) into a cache directory, and the
# node's runtime (Debian's containerd, runc and busybox-static for local images):
#
#   ${KEYMOUNT_CONTROL_PLANE_DIR:-/var/cache/keymount/control-plane}/
#     bin/kube-apiserver bin/kubelet bin/kube-controller-manager
#     bin/etcd -> /usr/bin/etcd   STAMP   build.log
#
# Idempotent: with a valid STAMP the build is skipped (only apt packages are checked).
# Runs as root, non-interactively.  Usage: bash scripts/prepare-control-plane.sh
set -euo pipefail

CACHE_DIR="${KEYMOUNT_CONTROL_PLANE_DIR:-/var/cache/keymount/control-plane}"
BIN_DIR="$CACHE_DIR/bin"
STAMP_FILE="$CACHE_DIR/STAMP"
BUILD_LOG="$CACHE_DIR/build.log"
WORK_DIR="$CACHE_DIR/build"
VERSION_TAG="k8s-1.20.2+reflect2-1.0.2+node"
K8S_BINARIES=(kube-apiserver kubelet kube-controller-manager)
K8S_UPSTREAM_VERSION="1.20.2"
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
DEB_SRC_FILE=/etc/apt/sources.list.d/keymount-deb-src.sources

export DEBIAN_FRONTEND=noninteractive

log() { printf '[prepare-control-plane] %s\n' "$*"; }
BUILDING=0
die() {
    log "ERROR: $*" >&2
    if [[ $BUILDING -eq 1 && -s "$BUILD_LOG" ]]; then
        log "last lines of $BUILD_LOG:" >&2
        tail -n 40 "$BUILD_LOG" >&2 || true
    fi
    exit 1
}

on_build_failure() {
    local rc=$?
    if [[ -f "$BUILD_LOG" ]]; then
        log "build failed (exit $rc); last lines of $BUILD_LOG:" >&2
        tail -n 40 "$BUILD_LOG" >&2 || true
    fi
    exit "$rc"
}

[[ $(id -u) -eq 0 ]] || die "must run as root (installs apt packages)"

# ---------------------------------------------------------------- apt packages
RUNTIME_PKGS=(etcd-server etcd-client openssl ca-certificates containerd runc busybox-static)
BUILD_PKGS=(golang-go jq rsync dpkg-dev make golang-github-modern-go-reflect2-dev)

apt_updated=0
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq </dev/null >/dev/null
        apt_updated=1
    fi
    log "installing: ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
}

apt_install "${RUNTIME_PKGS[@]}" "${BUILD_PKGS[@]}"
[[ -x /usr/bin/etcd ]] || die "/usr/bin/etcd missing after installing etcd-server"

# The etcd-server package may start a system etcd on 127.0.0.1:2379 (where an init
# system exists).  The test bed runs its own etcd on free ports, so it does not care.

# ---------------------------------------------------------------- stamp / cache key
reflect2_hash() {
    # sha256 over (name, content) of the files that replace the vendored reflect2
    ( cd "$REFLECT2_SRC" \
      && find . -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
         | LC_ALL=C sort | xargs sha256sum ) | sha256sum | cut -d' ' -f1
}

[[ -d "$REFLECT2_SRC" ]] || die "$REFLECT2_SRC missing (golang-github-modern-go-reflect2-dev)"
EXPECTED_FIX_HASH="$(reflect2_hash)"

stamp_valid() {
    [[ -f "$STAMP_FILE" ]] || return 1
    grep -qx "version=$VERSION_TAG" "$STAMP_FILE" || return 1
    grep -qx "reflect2_sha256=$EXPECTED_FIX_HASH" "$STAMP_FILE" || return 1
    local b bin_hash
    for b in "${K8S_BINARIES[@]}"; do
        [[ -x "$BIN_DIR/$b" ]] || return 1
        bin_hash="$(sha256sum "$BIN_DIR/$b" | cut -d' ' -f1)"
        grep -qx "${b//-/_}_sha256=$bin_hash" "$STAMP_FILE" || return 1
    done
}

link_etcd() {
    mkdir -p "$BIN_DIR"
    ln -sfn /usr/bin/etcd "$BIN_DIR/etcd"
    if [[ -x /usr/bin/etcdctl ]]; then ln -sfn /usr/bin/etcdctl "$BIN_DIR/etcdctl"; fi
}

if stamp_valid; then
    link_etcd
    log "cache valid ($VERSION_TAG) in $CACHE_DIR; nothing to build"
    exit 0
fi

# ---------------------------------------------------------------- build
log "building ${K8S_BINARIES[*]} $VERSION_TAG into $CACHE_DIR (takes several minutes)"
rm -f "$STAMP_FILE"
mkdir -p "$CACHE_DIR" "$BIN_DIR"
rm -rf "$WORK_DIR"
mkdir -p "$WORK_DIR"
: >"$BUILD_LOG"
BUILDING=1
trap on_build_failure ERR

# deb-src entry: the machine's deb822 source entries, with Types: deb-src
if [[ ! -f "$DEB_SRC_FILE" ]]; then
    src=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        if grep -q 'deb\.debian\.org/debian\b\|/debian$' "$f" && grep -q '^Types:.*\bdeb\b' "$f"; then
            src="$f"; break
        fi
    done
    if [[ -n "$src" ]]; then
        log "adding deb-src entry $DEB_SRC_FILE (from $src)"
        sed -E 's/^Types:.*$/Types: deb-src/' "$src" >"$DEB_SRC_FILE"
    elif [[ -f /etc/apt/sources.list ]] && grep -q '^deb ' /etc/apt/sources.list; then
        log "adding deb-src entry (from /etc/apt/sources.list)"
        grep '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' \
            >/etc/apt/sources.list.d/keymount-deb-src.list
    else
        die "no apt source entry found to derive a deb-src entry from"
    fi
    apt-get update -qq </dev/null >>"$BUILD_LOG" 2>&1
fi

log "fetching Debian source package 'kubernetes'"
( cd "$WORK_DIR" && apt-get source -q kubernetes </dev/null ) >>"$BUILD_LOG" 2>&1
SRC_DIR="$(find "$WORK_DIR" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
[[ -n "$SRC_DIR" && -d "$SRC_DIR/vendor" ]] || die "unpacked kubernetes source not found in $WORK_DIR"
log "source: $SRC_DIR"

log "replacing vendored modern-go/reflect2 (v1.0.1) with Debian's 1.0.2"
VENDOR_R2="$SRC_DIR/vendor/github.com/modern-go/reflect2"
[[ -d "$VENDOR_R2" ]] || die "$VENDOR_R2 not found"
find "$VENDOR_R2" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' -delete
find "$REFLECT2_SRC" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
    -exec cp {} "$VENDOR_R2/" \;
VENDORED_FIX_HASH="$( (cd "$VENDOR_R2" && find . -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) \
    ! -name '*_test.go' | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -d' ' -f1)"
[[ "$VENDORED_FIX_HASH" == "$EXPECTED_FIX_HASH" ]] || die "reflect2 replacement hash mismatch"

log "compiling ${K8S_BINARIES[*]} (log: $BUILD_LOG)"
start_ts=$(date +%s)
(
    cd "$SRC_DIR"
    # GOPATH layout as in the package's debian/rules
    mkdir -p .go/src/k8s.io
    [[ -L .go/src/k8s.io/kubernetes ]] || ln -s ../../.. .go/src/k8s.io/kubernetes
    mkdir -p "$WORK_DIR/home"
    export GOPATH="$SRC_DIR/.go" CGO_ENABLED=0 HOME="$WORK_DIR/home"
    export PATH="/usr/lib/go/bin:$PATH"
    export GOFLAGS="" GO111MODULE=off
    make WHAT="${K8S_BINARIES[*]/#/cmd/}"
) </dev/null >>"$BUILD_LOG" 2>&1
log "compiled in $(( $(date +%s) - start_ts ))s"

for b in "${K8S_BINARIES[@]}"; do
    BUILT="$SRC_DIR/_output/bin/$b"
    [[ -x "$BUILT" ]] || BUILT="$(find "$SRC_DIR/_output" -type f -name "$b" -perm -u+x | head -n1)"
    [[ -n "$BUILT" && -x "$BUILT" ]] || die "$b binary not produced"
    install -m 0755 "$BUILT" "$BIN_DIR/$b.new"
    mv -f "$BIN_DIR/$b.new" "$BIN_DIR/$b"
    "$BIN_DIR/$b" --version >>"$BUILD_LOG" 2>&1
done
link_etcd

trap - ERR
BUILDING=0
log "cleaning up build tree"
rm -rf "$WORK_DIR"

{
    echo "version=$VERSION_TAG"
    echo "reflect2_sha256=$EXPECTED_FIX_HASH"
    for b in "${K8S_BINARIES[@]}"; do
        echo "${b//-/_}_sha256=$(sha256sum "$BIN_DIR/$b" | cut -d' ' -f1)"
    done
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$STAMP_FILE.new"
mv -f "$STAMP_FILE.new" "$STAMP_FILE"
log "done: $("$BIN_DIR/kube-apiserver" --version 2>&1), etcd $("$BIN_DIR/etcd" --version 2>/dev/null | head -n1 | awk '{print $3}')"
log "cache: $CACHE_DIR ($(du -sh "$CACHE_DIR" | cut -f1))"
