#!/usr/bin/env bash
# Installs the pinned virtiofsd (the Rust vhost-user virtio-fs daemon) that
# `vmm run --share` starts, and prints its path on stdout. Cached: a second run
# only prints the path. Usage: virtiofsd.sh [--quiet]
#
#   cache:   ${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}/virtiofsd-$version/bin/virtiofsd
#            (the path `vmm` looks in when neither --virtiofsd nor VMM_VIRTIOFSD is given)
#   build:   cargo install --locked, with Debian's libcap-ng-dev and libseccomp-dev
set -euo pipefail

version=1.14.0
build_deps=(libcap-ng-dev libseccomp-dev pkg-config)

quiet=0
for arg in "$@"; do
	case $arg in
	--quiet) quiet=1 ;;
	-h | --help)
		sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "virtiofsd.sh: unknown argument: $arg" >&2
		exit 2
		;;
	esac
done
log() { [[ $quiet == 1 ]] || echo "virtiofsd.sh: $*" >&2; }
die() {
	echo "virtiofsd.sh: error: $*" >&2
	exit 1
}

cache=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
root=$cache/virtiofsd-$version
binary=$root/bin/virtiofsd
if [[ -x $binary ]]; then
	echo "$binary"
	exit 0
fi

missing=()
for p in "${build_deps[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
	[[ $(id -u) == 0 ]] || die "need root to install: ${missing[*]}"
	log "installing build dependencies: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get -q -o Dpkg::Use-Pty=0 update >&2 || die "apt-get update failed"
	apt-get -q -o Dpkg::Use-Pty=0 install -y --no-install-recommends "${missing[@]}" >&2 ||
		die "apt-get install failed"
fi

mkdir -p "$cache"
log "building virtiofsd $version into $root (a few minutes)"
# A separate target dir so that a failed build leaves no half-installed binary.
cargo install virtiofsd --version "=$version" --locked --root "$root.tmp" \
	--target-dir "$cache/virtiofsd-build" $([[ $quiet == 1 ]] && echo --quiet) >&2 ||
	die "cargo install virtiofsd $version failed"
rm -rf "$root"
mv "$root.tmp" "$root"
rm -rf "$cache/virtiofsd-build"
echo "$binary"
