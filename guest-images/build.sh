#!/usr/bin/env bash
# Builds the project's default test guest from Debian packages:
#   out/vmlinux, out/bzImage        Linux 6.12 (Debian's linux-source-6.12), patches/*.patch,
#                                   configured from config/guest.config on top of tinyconfig
#   out/initramfs.cpio              uncompressed newc: init, busybox, accel-config (+ tests), bash
#   out/initramfs-base.cpio         its first part alone: init and busybox (fastest to boot),
#                                   with /lib/modules/<release>/ listing the built-in drivers
# Results are cached by content; see README.md. Usage: build.sh [--force] [--quiet]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=$here/cache
out=$here/out
build=$out/build

kernel_pkg=linux-source-6.12
kernel_arch=x86_64
# Packages whose files go into the initramfs: "package:path-in-package" (a directory
# takes everything below it). Their shared libraries are added by ELF dependency
# resolution from the Debian library packages they depend on.
base_files=(
	busybox-static:bin/busybox
)
extra_files=(
	accel-config:usr/bin/accel-config
	accel-config:etc/accel-config
	libaccel-config1:usr/lib/x86_64-linux-gnu
	accel-config-test:usr/libexec/accel-config/test
	# accel-config-test's runner scripts are bash scripts.
	bash:bin/bash
)
# Used on the build host only: ldconfig writes the image's /etc/ld.so.cache.
host_tool_pkgs=(libc-bin)
host_deps=(build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils lz4 binutils
	patch perl)

force=0
quiet=0
for arg in "$@"; do
	case $arg in
	--force) force=1 ;;
	--quiet) quiet=1 ;;
	-h | --help)
		sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "build.sh: unknown argument: $arg" >&2
		exit 2
		;;
	esac
done

start=$SECONDS
log() { [[ $quiet == 1 ]] || echo "build.sh: [$((SECONDS - start)) s] $*" >&2; }
die() {
	echo "build.sh: error: $*" >&2
	exit 1
}

export DEBIAN_FRONTEND=noninteractive
apt_q=(-q -o Dpkg::Use-Pty=0)
apt_updated=0
apt_update() {
	if [[ $apt_updated == 0 ]]; then
		log "apt-get update"
		apt-get "${apt_q[@]}" update >"$out/apt-update.log" 2>&1 ||
			die "apt-get update failed (see $out/apt-update.log)"
		apt_updated=1
	fi
}

as_root() {
	if [[ $(id -u) == 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null; then
		sudo -n "$@"
	else
		die "need root for: $*"
	fi
}

install_host_deps() {
	local missing=() p
	for p in "${host_deps[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
			missing+=("$p")
	done
	[[ ${#missing[@]} == 0 ]] && return
	log "installing build dependencies: ${missing[*]}"
	apt_update
	as_root env DEBIAN_FRONTEND=noninteractive apt-get "${apt_q[@]}" install -y \
		--no-install-recommends "${missing[@]}" >"$out/apt-install.log" 2>&1 ||
		die "apt-get install failed (see $out/apt-install.log)"
}

# Resolves every package the image may need: the listed ones plus the closure of
# their shared-library dependencies (the first alternative of each Depends or
# Pre-Depends entry named lib* or zlib1g: only those can provide a DT_NEEDED
# soname). Prints "name=version" lines (candidate versions), sorted. One apt-cache
# call per dependency level: each call costs most of a second.
resolve_packages() {
	local -A seen=()
	local level=("$@") next name version deps d
	while [[ ${#level[@]} -gt 0 ]]; do
		next=()
		while IFS=$'\t' read -r name version deps; do
			[[ -n ${seen[$name]:-} ]] && continue
			seen[$name]=$version
			while read -r d; do
				[[ -n $d && -z ${seen[$d]:-} ]] && next+=("$d")
			done < <(tr ',' '\n' <<<"$deps" | sed 's/|.*//; s/([^)]*)//g; s/:any//; s/[[:space:]]//g' |
				grep -E '^(lib|zlib1g$)' || true)
		done < <(apt-cache show --no-all-versions "${level[@]}" 2>/dev/null | awk '
			/^Package: / { name = $2 }
			/^Version: / { version = $2 }
			/^(Pre-)?Depends: / { sub(/^[^:]*: /, ""); deps = deps "," $0 }
			/^$/ { if (name != "") print name "\t" version "\t" deps; name = ""; deps = "" }
			END { if (name != "") print name "\t" version "\t" deps }')
		for name in "${level[@]}"; do
			if [[ -z ${seen[$name]:-} ]]; then
				echo "build.sh: apt offers no package $name" >&2
				return 1
			fi
		done
		mapfile -t level < <(printf '%s\n' "${next[@]}" | sort -u | sed '/^$/d')
	done
	for name in "${!seen[@]}"; do echo "$name=${seen[$name]}"; done | sort
}

# "name=version"... -> "name=version filename SHA256:..." lines, from apt without
# downloading anything.
manifest_of() {
	local -A spec_of=()
	local spec uri file size hash name
	for spec in "$@"; do spec_of[${spec%%=*}]=$spec; done
	apt-get "${apt_q[@]}" download --print-uris "$@" 2>/dev/null |
		while read -r uri file size hash; do
			[[ $uri == \'* ]] || continue
			name=${file%%_*}
			[[ -n ${spec_of[$name]:-} ]] || die "unexpected download $file (size $size)"
			echo "${spec_of[$name]} $file $hash"
		done | sort
}

# Downloads the .deb of a manifest line into cache/debs (kept between runs) and
# prints its path.
fetch_deb() {
	local spec=$1 file=$2 hash=$3 path
	path=$cache/debs/$file
	if [[ ! -f $path ]] || [[ $(sha256sum "$path" | cut -d' ' -f1) != "${hash#SHA256:}" ]]; then
		mkdir -p "$cache/debs"
		rm -f "$path"
		(cd "$cache/debs" && apt-get "${apt_q[@]}" -o APT::Sandbox::User=root download "$spec" \
			>/dev/null) || die "apt-get download $spec failed"
		[[ -f $path ]] || die "apt-get download $spec did not produce $file"
		[[ $(sha256sum "$path" | cut -d' ' -f1) == "${hash#SHA256:}" ]] ||
			die "checksum mismatch for $file"
	fi
	echo "$path"
}

hash_files() { cat "$@" | sha256sum | cut -d' ' -f1; }

# ---------------------------------------------------------------------------
# Inputs and cache keys

mkdir -p "$out" "$cache"
exec 9>"$out/.lock"
flock 9 # concurrent builds (parallel tests) wait for each other

install_host_deps
# A fresh machine may have no package lists at all.
compgen -G "/var/lib/apt/lists/*Packages*" >/dev/null || apt_update

pkg_name() { echo "${1%%:*}"; }
image_pkgs=()
for f in "${base_files[@]}" "${extra_files[@]}"; do image_pkgs+=("$(pkg_name "$f")"); done
# The package manifest (versions, file names, checksums) only changes when apt's
# package lists or this script do: reuse it until then.
roots=("$kernel_pkg" "${image_pkgs[@]}" "${host_tool_pkgs[@]}")
apt_state=$( {
	cat "$0"
	echo "${roots[@]}"
	stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* /var/lib/dpkg/status 2>/dev/null
} | sha256sum | cut -d' ' -f1)
if [[ $force == 0 && -f $out/packages.resolved && $(head -n1 "$out/packages.resolved") == "$apt_state" ]]; then
	manifest=$(tail -n +2 "$out/packages.resolved")
else
	if ! specs=$(resolve_packages "${roots[@]}"); then
		apt_update # stale or missing lists
		specs=$(resolve_packages "${roots[@]}") || die "cannot resolve packages ${roots[*]}"
	fi
	mapfile -t all_specs <<<"$specs"
	manifest=$(manifest_of "${all_specs[@]}")
	[[ $(wc -l <<<"$manifest") == "${#all_specs[@]}" ]] ||
		die "apt-get download --print-uris did not list all of: ${all_specs[*]}"
	printf '%s\n%s\n' "$apt_state" "$manifest" >"$out/packages.resolved"
fi
declare -A deb_spec=() deb_file=() deb_hash=()
while read -r spec file hash; do
	name=${spec%%=*}
	deb_spec[$name]=$spec
	deb_file[$name]=$file
	deb_hash[$name]=$hash
done <<<"$manifest"

toolchain_id=$( (gcc --version | head -n1; ld --version | head -n1))
patches=("$here"/patches/*.patch)
[[ -f ${patches[0]} ]] || die "no patches in $here/patches"
kernel_key=$( {
	hash_files "$here/build.sh" "$here/config/guest.config" "${patches[@]}"
	echo "${deb_spec[$kernel_pkg]} ${deb_hash[$kernel_pkg]}"
	echo "$toolchain_id"
} | sha256sum | cut -d' ' -f1)
initramfs_key=$( {
	hash_files "$here/build.sh" "$here"/init/*
	echo "$kernel_key" # /lib/modules comes from the kernel build
	echo "$manifest"
	echo "$toolchain_id"
} | sha256sum | cut -d' ' -f1)

stamp_ok() { [[ $force == 0 && -f $out/$1.key && $(cat "$out/$1.key") == "$2" ]]; }

# ---------------------------------------------------------------------------
# Kernel source: Debian's linux-source package, unpacked once per (package, patches)

src=$build/src
ensure_source() {
	local deb src_key
	src_key=$( {
		echo "${deb_spec[$kernel_pkg]} ${deb_hash[$kernel_pkg]}"
		hash_files "${patches[@]}"
	} | sha256sum | cut -d' ' -f1)
	[[ -f $build/src.key && $(cat "$build/src.key") == "$src_key" && -d $src ]] && return
	deb=$(fetch_deb "${deb_spec[$kernel_pkg]}" "${deb_file[$kernel_pkg]}" "${deb_hash[$kernel_pkg]}")
	log "unpacking ${deb##*/}"
	rm -rf "$src" "$build/src.key" "$build/obj" "$build/hdr"
	mkdir -p "$build/unpack"
	dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$build/unpack" --wildcards './usr/src/*.tar.xz'
	local tarball
	tarball=$(find "$build/unpack/usr/src" -name 'linux-source-*.tar.xz' | head -n1)
	[[ -n $tarball ]] || die "no source tarball in ${deb##*/}"
	tar -xJf "$tarball" -C "$build"
	mv "$build/$(basename "$tarball" .tar.xz)" "$src"
	rm -rf "$build/unpack"
	local p
	for p in "${patches[@]}"; do
		log "applying ${p##*/}"
		patch -d "$src" -p1 --forward --batch --quiet <"$p" || die "patch ${p##*/} does not apply"
	done
	echo "$src_key" >"$build/src.key"
}

# ---------------------------------------------------------------------------
# Kernel

kmake() { make -C "$src" O="$build/obj" ARCH="$kernel_arch" "$@"; }

# Every line of the fragment must hold in the final .config: CONFIG_X=v literally,
# "# CONFIG_X is not set" as not set.
verify_config() {
	local frag=$1 cfg=$2 line opt bad=()
	while IFS= read -r line; do
		case $line in
		CONFIG_*=*)
			grep -qxF "$line" "$cfg" || bad+=("$line (got: $(grep -E "^${line%%=*}=" "$cfg" || echo 'not set'))")
			;;
		"# CONFIG_"*" is not set")
			opt=${line#\# }
			opt=${opt%% *}
			if grep -qE "^$opt=" "$cfg"; then bad+=("$line (got: $(grep -E "^$opt=" "$cfg"))"); fi
			;;
		esac
	done <"$frag"
	if [[ ${#bad[@]} -gt 0 ]]; then
		printf 'build.sh: config option did not survive: %s\n' "${bad[@]}" >&2
		die "kernel configuration does not match ${frag#"$here"/} (missing dependencies?)"
	fi
}

build_kernel() {
	ensure_source
	mkdir -p "$build/obj"
	log "configuring kernel (tinyconfig + config/guest.config)"
	kmake -s tinyconfig >/dev/null
	# merge_config.sh runs make in the current directory; -n: allnoconfig for the rest.
	(cd "$src" && ARCH=$kernel_arch scripts/kconfig/merge_config.sh -n -O "$build/obj" \
		"$build/obj/.config" "$here/config/guest.config") >"$build/merge_config.log" 2>&1 ||
		die "merge_config.sh failed (see $build/merge_config.log)"
	verify_config "$here/config/guest.config" "$build/obj/.config"
	log "building vmlinux and bzImage with $(nproc) jobs (log: $build/kernel-build.log)"
	kmake -j"$(nproc)" vmlinux bzImage >"$build/kernel-build.log" 2>&1 ||
		{
			tail -n 40 "$build/kernel-build.log" >&2
			die "kernel build failed (see $build/kernel-build.log)"
		}
	cp "$build/obj/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
	cp "$build/obj/arch/x86/boot/bzImage" "$out/bzImage"
	cp "$build/obj/.config" "$out/kernel.config"
	cp "$build/obj/System.map" "$out/System.map"
	# What /lib/modules/<release>/ needs for modprobe of a built-in driver.
	cp "$build/obj/modules.builtin" "$build/obj/modules.builtin.modinfo" "$out/"
	cp "$build/obj/include/config/kernel.release" "$out/kernel.release"
}

if stamp_ok kernel "$kernel_key" && [[ -f $out/vmlinux && -f $out/bzImage ]]; then
	log "kernel up to date"
else
	rm -f "$out/kernel.key"
	build_kernel
	echo "$kernel_key" >"$out/kernel.key"
fi

# ---------------------------------------------------------------------------
# Initramfs

pkgdir() { echo "$build/pkgs/$1"; }
unpack_pkg() {
	local name=$1 deb dir
	dir=$(pkgdir "$name")
	[[ -f $dir.key && $(cat "$dir.key") == "${deb_hash[$name]}" ]] && return
	deb=$(fetch_deb "${deb_spec[$name]}" "${deb_file[$name]}" "${deb_hash[$name]}")
	rm -rf "$dir"
	mkdir -p "$dir"
	dpkg-deb -x "$deb" "$dir"
	echo "${deb_hash[$name]}" >"$dir.key"
}

# Copies one path of an unpacked package into the image, keeping symlinks and
# bringing along what they point to inside the package.
copy_from_pkg() {
	local pkg=$1 rel=${2#/} root=$3 src_path target
	src_path=$(pkgdir "$pkg")/$rel
	[[ -e $src_path || -L $src_path ]] || die "$pkg has no /$rel"
	mkdir -p "$root/$(dirname "$rel")"
	cp -a --no-preserve=ownership "$src_path" "$root/$(dirname "$rel")/"
	if [[ -L $src_path ]]; then
		target=$(readlink "$src_path")
		if [[ $target == /* ]]; then
			copy_from_pkg "$pkg" "$target" "$root"
		else
			copy_from_pkg "$pkg" "$(dirname "$rel")/$target" "$root"
		fi
	fi
}

# Whether $2 exists in the image rooted at $1, following symlinks inside the image
# (an absolute link target names a path in the image, not on the build host).
exists_in() {
	local root=$1 p=$2 n t
	for ((n = 0; n < 20; n++)); do
		if [[ -L $root$p ]]; then
			t=$(readlink "$root$p")
			if [[ $t == /* ]]; then p=$t; else p=$(dirname "$p")/$t; fi
		else
			[[ -e $root$p ]]
			return
		fi
	done
	return 1
}

is_elf() { [[ $(head -c4 "$1" | od -An -c | tr -d ' ') == '177ELF' ]]; }

# Adds the program interpreter and all DT_NEEDED libraries of every ELF file in the
# image, taking them from the unpacked library packages; repeats until closed.
resolve_libraries() {
	local root=$1 changed=1 f dep found p name
	local -a lib_pkgs=()
	for p in "${!deb_spec[@]}"; do
		[[ $p == lib* || $p == zlib1g ]] && lib_pkgs+=("$p")
	done
	while [[ $changed == 1 ]]; do
		changed=0
		while IFS= read -r f; do
			is_elf "$f" || continue
			while read -r dep; do
				[[ -z $dep ]] && continue
				if [[ $dep == /* ]]; then
					exists_in "$root" "$dep" && continue
					found=""
					for p in "${lib_pkgs[@]}"; do
						if [[ -e $(pkgdir "$p")$dep || -L $(pkgdir "$p")$dep ]]; then found=$p; break; fi
					done
					[[ -n $found ]] || die "no package provides interpreter $dep (needed by ${f#"$root"})"
					copy_from_pkg "$found" "$dep" "$root"
				else
					exists_in "$root" "/usr/lib/x86_64-linux-gnu/$dep" && continue
					found=""
					for p in "${lib_pkgs[@]}"; do
						for name in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
							if [[ -e $(pkgdir "$p")/$name/$dep ]]; then found="$p:$name/$dep"; break 2; fi
						done
					done
					[[ -n $found ]] ||
						die "no library package provides $dep (needed by ${f#"$root"}); add its package"
					copy_from_pkg "${found%%:*}" "${found#*:}" "$root"
				fi
				changed=1
			done < <(
				readelf -lW "$f" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p'
				readelf -dW "$f" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'
			)
		done < <(find "$root" -type f)
	done
}

# Writes a gen_init_cpio list for the entries of $1 that are not in $2 (if given).
cpio_list() {
	local root=$1 except=${2:-} type mode path
	(cd "$root" && find . -mindepth 1 -printf '%y %m %P\n' | LC_ALL=C sort -k3) |
		while read -r type mode path; do
			[[ $path == *[[:space:]]* ]] && die "file name with white space: $path"
			if [[ -n $except ]] && [[ -e $except/$path || -L $except/$path ]]; then
				continue
			fi
			case $type in
			d) echo "dir /$path $mode 0 0" ;;
			f) echo "file /$path $root/$path $mode 0 0" ;;
			l) echo "slink /$path $(readlink "$root/$path") $mode 0 0" ;;
			*) die "unsupported file type $type: $path" ;;
			esac
		done
}

build_init() {
	local hdr=$build/hdr nolibc=$src/tools/include/nolibc
	log "installing kernel UAPI headers for init"
	make -C "$src" O="$hdr" ARCH="$kernel_arch" -s headers >"$build/headers.log" 2>&1 ||
		die "make headers failed (see $build/headers.log)"
	gcc -Os -static -nostdlib -nostdinc -fno-stack-protector -fno-asynchronous-unwind-tables \
		-fno-ident -Wall -Wextra -Werror -isystem "$hdr/usr/include" -I "$nolibc" \
		-include "$nolibc/nolibc.h" -Wl,--build-id=none -s \
		-o "$build/init" "$here/init/init.c" -lgcc
	gcc -O2 -o "$build/gen_init_cpio" "$src/usr/gen_init_cpio.c"
}

build_initramfs() {
	local base=$out/rootfs-base root=$out/rootfs entry pkg
	ensure_source
	build_init
	for name in "${!deb_spec[@]}"; do
		[[ $name == "$kernel_pkg" ]] || unpack_pkg "$name"
	done

	log "assembling root file system"
	rm -rf "$base" "$root"
	mkdir -p "$base"/{dev,proc,sys,run,root,etc,usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64}
	install -d -m 1777 "$base/tmp"
	# usr-merged layout, as Debian bookworm installs it
	ln -s usr/bin "$base/bin"
	ln -s usr/sbin "$base/sbin"
	ln -s usr/lib "$base/lib"
	ln -s usr/lib64 "$base/lib64"
	install -m 0755 "$build/init" "$base/init"
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$base/etc/passwd"
	printf 'root:x:0:\n' >"$base/etc/group"
	for entry in "${base_files[@]}"; do copy_from_pkg "${entry%%:*}" "${entry#*:}" "$base"; done
	# /lib/modules/<release>/ as a distribution ships it, for a kernel without
	# loadable modules: the built-in list makes "modprobe idxd" (which
	# accel-config's test runner runs) succeed, and an empty modules.dep
	# keeps modprobe quiet about everything else.
	local modules
	modules=$base/usr/lib/modules/$(cat "$out/kernel.release")
	mkdir -p "$modules"
	cp "$out/modules.builtin" "$out/modules.builtin.modinfo" "$modules/"
	: >"$modules/modules.dep"
	# Busybox applets as symlinks (the packaged binary runs on the build host: it
	# is static); /init is the project's, not busybox's linuxrc.
	while read -r applet; do
		[[ $applet == */* ]] || continue
		[[ -e $base/$applet || -L $base/$applet ]] || ln -s /usr/bin/busybox "$base/$applet"
	done < <("$base/usr/bin/busybox" --list-full)

	cp -a "$base" "$root"
	for entry in "${extra_files[@]}"; do copy_from_pkg "${entry%%:*}" "${entry#*:}" "$root"; done
	resolve_libraries "$root"
	# The packaged ldconfig (static) writes the image's loader cache, sparing the
	# guest's dynamic loader a directory search per library.
	: >"$root/etc/ld.so.conf"
	if [[ $(id -u) == 0 ]]; then
		"$(pkgdir libc-bin)/sbin/ldconfig" -X -r "$root" || die "ldconfig failed"
	else
		log "warning: not root, so no /etc/ld.so.cache (ldconfig -r needs chroot)"
	fi

	log "writing cpio archives"
	{
		cpio_list "$base"
		# The kernel opens /dev/console for init's stdin/stdout/stderr.
		echo "nod /dev/console 0600 0 0 c 5 1"
	} >"$build/base.list"
	cpio_list "$root" "$base" >"$build/extra.list"
	"$build/gen_init_cpio" -t 0 "$build/base.list" >"$out/initramfs-base.cpio.tmp"
	"$build/gen_init_cpio" -t 0 "$build/extra.list" >"$build/extra.cpio"
	# The kernel unpacks concatenated archives in order.
	cat "$out/initramfs-base.cpio.tmp" "$build/extra.cpio" >"$out/initramfs.cpio.tmp"
	mv "$out/initramfs-base.cpio.tmp" "$out/initramfs-base.cpio"
	mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
	echo "$manifest" >"$out/packages.manifest"
}

check_rootfs() {
	local root=$out/rootfs f missing version
	log "checking the image's programs with its own loader and libraries"
	grep -qx 'kernel/drivers/dma/idxd/idxd.ko' "$root/lib/modules/$(cat "$out/kernel.release")/modules.builtin" ||
		die "image's modules.builtin does not list idxd"
	for f in /init /usr/bin/busybox /usr/bin/sh /usr/bin/accel-config /usr/bin/bash \
		/usr/libexec/accel-config/test/dsa_test /usr/libexec/accel-config/test/iaa_test \
		/usr/lib64/ld-linux-x86-64.so.2; do
		exists_in "$root" "$f" || die "image lacks $f"
	done
	for f in /usr/bin/accel-config /usr/bin/bash /usr/libexec/accel-config/test/dsa_test \
		/usr/libexec/accel-config/test/iaa_test; do
		missing=$("$root/usr/lib64/ld-linux-x86-64.so.2" --library-path \
			"$root/usr/lib/x86_64-linux-gnu" --list "$root$f" | grep -F 'not found' || true)
		[[ -z $missing ]] || die "$f: unresolved libraries: $missing"
	done
	if [[ $(id -u) == 0 ]]; then
		# accel-config refuses to run unless /sys/module/idxd exists (it does in the
		# guest, idxd being built in); fake it for the moment of the check.
		mkdir -p "$root/sys/module/idxd"
		version=$(chroot "$root" /usr/bin/accel-config --version) || version=""
		rm -rf "$root/sys/module"
		[[ -n $version ]] || die "accel-config does not run in the image (chroot)"
		log "accel-config $version runs in the image (chroot)"
		chroot "$root" /usr/bin/bash -c 'exit 0' || die "bash does not run in the image (chroot)"
		chroot "$root" /usr/bin/sh -c 'exit 0' || die "busybox sh does not run in the image (chroot)"
	fi
}

if stamp_ok initramfs "$initramfs_key" && [[ -f $out/initramfs.cpio && -f $out/initramfs-base.cpio ]]; then
	log "initramfs up to date"
else
	rm -f "$out/initramfs.key"
	build_initramfs
	check_rootfs
	echo "$initramfs_key" >"$out/initramfs.key"
fi

log "done in $((SECONDS - start)) s"
echo "vmlinux=$out/vmlinux"
echo "bzImage=$out/bzImage"
echo "initramfs=$out/initramfs.cpio"
echo "initramfs_base=$out/initramfs-base.cpio"
