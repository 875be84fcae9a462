#!/usr/bin/env bash
# Fetches Debian's distribution kernel (the package linux-image-amd64 depends on)
# with apt-get download, unpacks it without installing anything, and prints the
# paths `vmm run --kernel` takes:
#   vmlinuz=.../boot/vmlinuz-RELEASE   the bzImage as Debian ships it
#   vmlinux=.../vmlinux                its payload, decompressed (ELF): on a KVM that
#                                      emulates early boot code (PVM) the bzImage's
#                                      own decompressor takes minutes
#   modules=.../lib/modules/RELEASE    its module tree (what vmm run carries in)
# Cached in ${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}/debian-kernel/PACKAGE.
# Usage: debian-kernel.sh [PACKAGE]   (default: linux-image-amd64's dependency)
set -euo pipefail

log() { echo "debian-kernel.sh: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

export DEBIAN_FRONTEND=noninteractive
pkg=${1:-}
if [[ -z $pkg ]]; then
	pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
	if [[ -z $pkg ]]; then
		apt-get -q -o Dpkg::Use-Pty=0 update >&2 || die "apt-get update failed"
		pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')
	fi
	[[ -n $pkg ]] || die "apt knows no linux-image-amd64"
fi

cache=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}/debian-kernel/$pkg
if [[ ! -f $cache/vmlinux ]]; then
	rm -rf "$cache.tmp"
	mkdir -p "$cache.tmp/deb"
	log "downloading $pkg"
	(cd "$cache.tmp/deb" && apt-get -q -o Dpkg::Use-Pty=0 download "$pkg" >&2) ||
		die "apt-get download $pkg failed"
	dpkg-deb -x "$cache.tmp"/deb/*.deb "$cache.tmp" || die "dpkg-deb -x failed"
	rm -rf "$cache.tmp/deb"
	vmlinuz=$(ls "$cache.tmp"/boot/vmlinuz-*)
	# The setup header: setup_sects at 0x1f1 (0 means 4), payload_offset and
	# payload_length at 0x248 and 0x24c, relative to the protected-mode code.
	u() { od -An -t "u$2" -j "$(($1))" -N "$2" "$vmlinuz" | tr -d ' '; }
	sects=$(u 0x1f1 1)
	[[ $sects == 0 ]] && sects=4
	start=$(((sects + 1) * 512 + $(u 0x248 4)))
	dd if="$vmlinuz" of="$cache.tmp/payload" iflag=skip_bytes,count_bytes bs=1M \
		skip="$start" count="$(u 0x24c 4)" status=none
	case $(od -An -tx1 -N6 "$cache.tmp/payload" | tr -d ' ') in
	fd377a585a00) xz -dc --single-stream "$cache.tmp/payload" >"$cache.tmp/vmlinux" ;;
	1f8b*) gzip -dc "$cache.tmp/payload" >"$cache.tmp/vmlinux" 2>/dev/null || true ;;
	28b52ffd*) zstd -dcq "$cache.tmp/payload" >"$cache.tmp/vmlinux" ;;
	*) die "unknown bzImage payload compression in $vmlinuz" ;;
	esac
	rm -f "$cache.tmp/payload"
	[[ $(od -An -c -N4 "$cache.tmp/vmlinux" | tr -d ' ') == 177ELF ]] || die "payload is not an ELF kernel"
	rm -rf "$cache"
	mv "$cache.tmp" "$cache"
fi
vmlinuz=$(ls "$cache"/boot/vmlinuz-*)
release=${vmlinuz##*/vmlinuz-}
echo "vmlinuz=$vmlinuz"
echo "vmlinux=$cache/vmlinux"
echo "modules=$cache/lib/modules/$release"
