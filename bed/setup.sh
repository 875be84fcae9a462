#!/usr/bin/env bash
# Sets up the nested ordinary-KVM test bed on this kind of machine, from Debian
# packages alone:
#   QEMU           qemu-system-x86 from bookworm-backports (10.0; bookworm's 7.2 does not
#                  arm DR7 breakpoints for a nested SVM guest), installed on this host;
#                  a bookworm-backports sources entry is added on the mirror the host uses
#   out/l1/vmlinuz Debian's linux-image-6.1.0-*-amd64 kernel for L1 (downloaded, not installed)
#   out/l1/modules the KVM module chain in load order: irqbypass kvm ccp kvm-amd
#   out/l1/busybox busybox-static, L1's whole userland
# Results are cached by content (cache/debs, out/l1). Prints key=value lines:
# qemu=, kernel=, modules=, busybox=. Usage: setup.sh [--force] [--quiet]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=$here/cache
out=$here/out
l1=$out/l1

backports=bookworm-backports
# Oldest QEMU measured to arm DR7 breakpoints for a nested SVM guest under TCG.
qemu_min_major=10
# In load order: each module depends only on the ones before it.
kvm_modules=(irqbypass kvm ccp kvm-amd)

force=0
quiet=0
for arg in "$@"; do
	case $arg in
	--force) force=1 ;;
	--quiet) quiet=1 ;;
	-h | --help)
		sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "setup.sh: unknown argument: $arg" >&2
		exit 2
		;;
	esac
done

start=$SECONDS
log() { [[ $quiet == 1 ]] || echo "setup.sh: [$((SECONDS - start)) s] $*" >&2; }
die() {
	echo "setup.sh: error: $*" >&2
	exit 1
}

export DEBIAN_FRONTEND=noninteractive
apt_q=(-q -o Dpkg::Use-Pty=0)

as_root() {
	if [[ $(id -u) == 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null; then
		sudo -n "$@"
	else
		die "need root for: $*"
	fi
}

apt_update() {
	log "apt-get update"
	as_root apt-get "${apt_q[@]}" update >"$out/apt-update.log" 2>&1 ||
		die "apt-get update failed (see $out/apt-update.log)"
}

mkdir -p "$out" "$cache/debs"
exec 9>"$out/.lock"
flock 9 # concurrent runs wait for each other

# ---------------------------------------------------------------------------
# bookworm-backports on the host's own Debian mirror

# The URI of the first Debian source (deb822 or one-line format) that carries suite
# bookworm: the mirror this machine already uses.
debian_mirror() {
	local f
	for f in /etc/apt/sources.list.d/*.sources; do
		[[ -f $f ]] || continue
		awk '
			/^[[:space:]]*$/ { if (uri != "" && bw) { print uri; exit } uri = ""; bw = 0; next }
			/^URIs:/ { uri = $2 }
			/^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") bw = 1 }
			END { if (uri != "" && bw) print uri }' "$f"
	done
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[[ -f $f ]] || continue
		awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { if ($(i + 1) == "bookworm") print $i; break } }' "$f"
	done
}

backports_configured() {
	grep -rqsE "^[^#]*\<$backports\>" /etc/apt/sources.list /etc/apt/sources.list.d/
}

ensure_backports() {
	local mirror list=/etc/apt/sources.list.d/$backports.sources
	backports_configured && return
	mirror=$(debian_mirror | head -n1)
	[[ -n $mirror ]] || die "no Debian bookworm source in /etc/apt/sources.list*: cannot tell which mirror to use"
	log "adding $backports from $mirror ($list)"
	printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
		"$mirror" "$backports" | as_root tee "$list" >/dev/null
	apt_update
}

qemu_major() {
	local v
	command -v qemu-system-x86_64 >/dev/null || return 0
	v=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
	echo "${v:-0}"
}

ensure_qemu() {
	local major
	major=$(qemu_major)
	if [[ -n $major && $major -ge $qemu_min_major ]]; then
		return
	fi
	ensure_backports
	compgen -G "/var/lib/apt/lists/*${backports}*Packages*" >/dev/null || apt_update
	log "installing qemu-system-x86 from $backports (found: ${major:-none})"
	as_root apt-get "${apt_q[@]}" install -y --no-install-recommends -t "$backports" \
		qemu-system-x86 >"$out/apt-install.log" 2>&1 ||
		die "apt-get install -t $backports qemu-system-x86 failed (see $out/apt-install.log)"
	major=$(qemu_major)
	[[ -n $major && $major -ge $qemu_min_major ]] ||
		die "qemu-system-x86_64 is version ${major:-none}, the bed needs $qemu_min_major or later"
}

# ---------------------------------------------------------------------------
# L1 kernel, modules and busybox: downloaded .debs, unpacked, nothing installed

# Prints "name=version file SHA256:hash" for the candidate of package $1.
deb_of() {
	local uri file size hash version
	version=$(apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
	[[ -n $version ]] || return 1
	read -r uri file size hash < <(apt-get "${apt_q[@]}" download --print-uris "$1=$version" \
		2>/dev/null | grep "^'") || return 1
	echo "$1=$version $file $hash"
}

fetch_deb() { # name=version file hash -> path
	local spec=$1 file=$2 hash=$3 path=$cache/debs/$2
	if [[ ! -f $path ]] || [[ $(sha256sum "$path" | cut -d' ' -f1) != "${hash#SHA256:}" ]]; then
		rm -f "$path"
		log "downloading $file"
		(cd "$cache/debs" && apt-get "${apt_q[@]}" -o APT::Sandbox::User=root download "$spec" \
			>/dev/null) || die "apt-get download $spec failed"
		[[ -f $path ]] || die "apt-get download $spec did not produce $file"
		[[ $(sha256sum "$path" | cut -d' ' -f1) == "${hash#SHA256:}" ]] ||
			die "checksum mismatch for $file"
	fi
	echo "$path"
}

# linux-image-amd64 names the current 6.1 ABI's package, linux-image-6.1.0-N-amd64.
l1_kernel_pkg() {
	apt-cache depends linux-image-amd64 2>/dev/null |
		sed -n 's/^ *Depends: \(linux-image-6\.1\.0-[0-9]*-amd64\)$/\1/p' | head -n1
}

ensure_l1() {
	local kpkg kline bline key kdeb bdeb m f unpack=$out/l1-unpack
	compgen -G "/var/lib/apt/lists/*Packages*" >/dev/null || apt_update
	kpkg=$(l1_kernel_pkg)
	[[ -n $kpkg ]] || { apt_update; kpkg=$(l1_kernel_pkg); }
	[[ -n $kpkg ]] || die "apt offers no linux-image-6.1.0-*-amd64 (through linux-image-amd64)"
	kline=$(deb_of "$kpkg") || die "apt-get download --print-uris $kpkg failed"
	bline=$(deb_of busybox-static) || die "apt-get download --print-uris busybox-static failed"
	key=$( {
		sha256sum "$0" | cut -d' ' -f1
		echo "$kline"
		echo "$bline"
	} | sha256sum | cut -d' ' -f1)
	if [[ $force == 0 && -f $l1/key && $(cat "$l1/key") == "$key" ]]; then
		return
	fi
	# shellcheck disable=SC2086 # three words: spec, file, hash
	kdeb=$(fetch_deb $kline)
	# shellcheck disable=SC2086
	bdeb=$(fetch_deb $bline)
	log "unpacking L1 kernel, KVM modules and busybox"
	rm -rf "$l1" "$unpack"
	mkdir -p "$l1/modules" "$unpack"
	dpkg-deb --fsys-tarfile "$kdeb" | tar -x -C "$unpack" --wildcards './boot/vmlinuz-*' \
		'./lib/modules/*/kernel/virt/lib/irqbypass.ko' './lib/modules/*/kernel/arch/x86/kvm/*.ko' \
		'./lib/modules/*/kernel/drivers/crypto/ccp/ccp.ko'
	f=$(find "$unpack/boot" -name 'vmlinuz-*' | head -n1)
	[[ -n $f ]] || die "${kdeb##*/} has no /boot/vmlinuz-*"
	cp "$f" "$l1/vmlinuz"
	for m in "${kvm_modules[@]}"; do
		f=$(find "$unpack/lib/modules" -name "$m.ko" | head -n1)
		[[ -n $f ]] || die "${kdeb##*/} has no $m.ko"
		cp "$f" "$l1/modules/$m.ko"
	done
	printf '%s\n' "${kvm_modules[@]}" >"$l1/modules/order"
	rm -rf "$unpack"
	mkdir -p "$unpack"
	dpkg-deb -x "$bdeb" "$unpack"
	cp "$unpack/bin/busybox" "$l1/busybox"
	rm -rf "$unpack"
	echo "${kline%% *}" >"$l1/kernel.version"
	echo "$key" >"$l1/key"
}

# Used by run.sh on this host: cpio writes L1's initramfs, strip shrinks test binaries.
host_deps=(cpio binutils)
ensure_host_deps() {
	local missing=() p
	for p in "${host_deps[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
			missing+=("$p")
	done
	[[ ${#missing[@]} == 0 ]] && return
	log "installing ${missing[*]}"
	apt_update
	as_root apt-get "${apt_q[@]}" install -y --no-install-recommends "${missing[@]}" \
		>"$out/apt-install.log" 2>&1 || die "apt-get install failed (see $out/apt-install.log)"
}

ensure_host_deps
ensure_qemu
# What apt offers only changes with its package lists (or this script): until then
# the unpacked L1 files stand without asking apt again.
apt_state=$( {
	cat "$0"
	stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null
} | sha256sum | cut -d' ' -f1)
if [[ $force == 1 || ! -f $l1/apt-state || $(cat "$l1/apt-state") != "$apt_state" ]]; then
	ensure_l1
	echo "$apt_state" >"$l1/apt-state"
fi
log "done in $((SECONDS - start)) s"
echo "qemu=$(command -v qemu-system-x86_64)"
echo "kernel=$l1/vmlinuz"
echo "modules=$l1/modules"
echo "busybox=$l1/busybox"
