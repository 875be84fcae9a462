#!/usr/bin/env bash
# Runs shell commands inside L1 of the nested ordinary-KVM bed (see README.md):
# QEMU TCG with an emulated AMD CPU (SVM, NPT), Debian's 6.1 kernel with kvm_amd,
# busybox, and the given host files at the same absolute paths as on this host
# (ELF files with the libraries `ldd` lists), so paths compiled into programs
# still hold. The commands run one after another in L1 under busybox sh, from /,
# with /dev/kvm present; each one's stdout, stderr and exit status come back as
#   OUT/N.stdout  OUT/N.stderr  OUT/N.status   (N = 1, 2, ... in command order)
# and L1's console log as OUT/console.log. A command that did not finish (L1
# timed out or died) has no N.status.
#
# Usage: run.sh [--include PATH]... [--out DIR] [--cpus N] [--memory MiB]
#               [--timeout SECS] [--quiet] [--] COMMAND...
#   --include PATH  a file or directory to bring into L1 (repeatable)
#   --out DIR       where the results go (default: out/run; emptied first)
# Exit status: 0 when L1 ran every command (whatever their statuses), 1 otherwise.
set -euo pipefail
# The whole script is one compound command: bash reads it all before running,
# so editing this file during a run (which lasts minutes) cannot derail it.
{
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out_dir=$here/out/run
cpus=2
memory=3072
timeout=1800
quiet=0
includes=()
commands=()
while (($#)); do
	case $1 in
	--include) includes+=("${2:?--include needs a path}"); shift 2 ;;
	--out) out_dir=${2:?--out needs a directory}; shift 2 ;;
	--cpus) cpus=${2:?--cpus needs a number}; shift 2 ;;
	--memory) memory=${2:?--memory needs MiB}; shift 2 ;;
	--timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
	--quiet) quiet=1; shift ;;
	-h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	--) shift; commands+=("$@"); break ;;
	-*) echo "run.sh: unknown option: $1" >&2; exit 2 ;;
	*) commands+=("$1"); shift ;;
	esac
done
[[ ${#commands[@]} -gt 0 ]] || { echo "run.sh: no command given" >&2; exit 2; }

start=$SECONDS
log() { [[ $quiet == 1 ]] || echo "run.sh: [$((SECONDS - start)) s] $*" >&2; }
die() {
	echo "run.sh: error: $*" >&2
	exit 1
}

setup_args=(--quiet)
declare -A bed=()
while IFS='=' read -r k v; do bed[$k]=$v; done < <("$here/setup.sh" "${setup_args[@]}") ||
	die "bed/setup.sh failed"
for k in qemu kernel modules busybox; do
	[[ -n ${bed[$k]:-} && -e ${bed[$k]} ]] || die "bed/setup.sh did not provide $k"
done

rm -rf "$out_dir"
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
stage=$out_dir/rootfs
mkdir -p "$stage"/{usr/bin,usr/sbin,usr/lib,usr/lib64,dev,proc,sys,tmp,run,root,bed/cmd}
# usr-merged, as on the Debian host, so that every path ldd prints is valid in L1
for d in bin sbin lib lib64; do ln -s "usr/$d" "$stage/$d"; done

is_elf() { [[ $(head -c4 "$1" 2>/dev/null | od -An -c | tr -d ' ') == '177ELF' ]]; }

# Copies host path $1 (a file, followed if a symlink) to the same path in L1.
# ELF programs and libraries lose their debug sections (test binaries shrink to
# a fifth); kernel modules are copied as they are (stripping drops their signature).
add_file() {
	local path=$1 dst=$stage$1
	[[ -e $dst ]] && return
	mkdir -p "$(dirname "$dst")"
	if [[ $path != *.ko ]] && is_elf "$path"; then
		strip --strip-debug -o "$dst" "$path" 2>/dev/null || cp -L "$path" "$dst"
		chmod --reference="$path" "$dst"
		add_libraries "$path"
	else
		cp -L --preserve=mode "$path" "$dst"
	fi
}

add_libraries() {
	local lib
	# "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
	while read -r lib; do
		[[ -n $lib ]] && add_file "$lib"
	done < <(ldd "$1" 2>/dev/null | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p')
}

add_path() {
	local path f
	path=$(realpath -s "$1")
	[[ -e $path ]] || die "--include $1: no such file or directory"
	if [[ -d $path ]]; then
		while IFS= read -r f; do add_file "$f"; done < <(find "$path" -type f)
	else
		add_file "$path"
	fi
}

log "assembling L1's initramfs"
install -m 0755 "${bed[busybox]}" "$stage/usr/bin/busybox"
mkdir -p "$stage/bed/modules"
cp "${bed[modules]}"/* "$stage/bed/modules/"
for p in "${includes[@]}"; do add_path "$p"; done
n=0
for c in "${commands[@]}"; do
	n=$((n + 1))
	printf '%s\n' "$c" >"$stage/bed/cmd/$n"
done
cat >"$stage/init" <<'INIT'
#!/usr/bin/busybox sh
# L1's init: KVM modules, then every /bed/cmd/N in order, results framed on ttyS1.
/usr/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp/bed
# What a Debian system has in /dev beyond devtmpfs (bash's <(...) needs /dev/fd).
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
mount -t tmpfs tmpfs /dev/shm
say() { echo "bed: [$(cut -d' ' -f1 /proc/uptime) s] $*" >/dev/ttyS0; }
for m in $(cat /bed/modules/order); do
	insmod /bed/modules/$m.ko || say "insmod $m failed"
done
[ -c /dev/kvm ] && say "/dev/kvm is up" || say "no /dev/kvm after loading the KVM modules"
stty -F /dev/ttyS1 raw -echo
# One section per stream: "BED-BEGIN N stdout|stderr", base64 lines, "BED-END";
# then "BED-STATUS N code".
section() {
	echo "BED-BEGIN $1 $2"
	base64 "$3"
	echo "BED-END"
}
n=1
while [ -f /bed/cmd/$n ]; do
	say "command $n: $(head -c 200 /bed/cmd/$n | head -n 1)"
	cd /
	sh /bed/cmd/$n </dev/null >/tmp/bed/$n.stdout 2>/tmp/bed/$n.stderr
	status=$?
	say "command $n ended with status $status"
	{
		section $n stdout /tmp/bed/$n.stdout
		section $n stderr /tmp/bed/$n.stderr
		echo "BED-STATUS $n $status"
	} >/dev/ttyS1
	rm -f /tmp/bed/$n.stdout /tmp/bed/$n.stderr
	n=$((n + 1))
done
say "all commands ran"
sync
poweroff -f
INIT
chmod 0755 "$stage/init"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
	>"$out_dir/initramfs.cpio"
log "initramfs: $(($(stat -c %s "$out_dir/initramfs.cpio") / 1048576)) MiB, $n command(s)"
rm -rf "$stage"

: >"$out_dir/console.log"
: >"$out_dir/results"
log "booting L1: ${bed[qemu]} -accel tcg -cpu max -smp $cpus -m ${memory}M (limit $timeout s)"
set +e
timeout --kill-after=10 "$timeout" "${bed[qemu]}" \
	-accel tcg,thread=multi -cpu max -smp "$cpus" -m "$memory" \
	-nodefaults -no-user-config -display none -no-reboot \
	-kernel "${bed[kernel]}" -initrd "$out_dir/initramfs.cpio" \
	-append "console=ttyS0 panic=-1 quiet mitigations=off" \
	-serial "file:$out_dir/console.log" -serial "file:$out_dir/results" \
	</dev/null >"$out_dir/qemu.log" 2>&1
qemu_status=$?
set -e
rm -f "$out_dir/initramfs.cpio"
log "L1 ended (QEMU status $qemu_status)"

# Unframes ttyS1 into N.stdout, N.stderr, N.status.
awk -v dir="$out_dir" '
	/^BED-BEGIN / { file = dir "/" $2 "." $3 ".b64"; printf "" > file; next }
	/^BED-END/ { close(file); file = ""; next }
	/^BED-STATUS / { print $3 > (dir "/" $2 ".status"); close(dir "/" $2 ".status"); next }
	file != "" { print > file }' <(tr -d '\r' <"$out_dir/results")
for f in "$out_dir"/*.b64; do
	[[ -e $f ]] || continue
	base64 -d "$f" >"${f%.b64}" || die "corrupt result stream for ${f##*/}"
	rm -f "$f"
done

missing=0
for ((i = 1; i <= n; i++)); do
	if [[ -f $out_dir/$i.status ]]; then
		log "command $i: status $(cat "$out_dir/$i.status")"
	else
		log "command $i: did not finish"
		missing=1
	fi
done
if [[ $missing == 1 ]]; then
	[[ $qemu_status == 124 ]] && log "L1 timed out after $timeout s"
	log "last lines of L1's console ($out_dir/console.log):"
	tail -n 15 "$out_dir/console.log" | sed 's/^/    /' >&2
	exit 1
fi
log "done in $((SECONDS - start)) s"
exit 0
}
