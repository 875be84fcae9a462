#!/usr/bin/env bash
# Boot-to-/init time of the default guest on this project's VMM and, in the same
# run, on QEMU (Debian's qemu-system-x86, -accel kvm, direct kernel boot) with the
# same kernel, initramfs and command line; prints both and their ratio.
#
# Usage: boot-bench.sh [--limit SECONDS]   (default limit 300 s per VMM)
# Logs: out/boot-bench/{vmm,qemu}.log, each line prefixed with seconds since launch.
#
# The clock is the wall clock of this machine from launching the VMM process to the
# kernel printing "Run /init as init process"; the guest's own printk time is shown
# beside it. Machines here are noisy: compare the ratio, not the seconds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
out=$here/out
work=$out/boot-bench
limit=300
while (($#)); do
	case $1 in
	--limit) limit=${2:?--limit needs seconds}; shift 2 ;;
	*) echo "boot-bench: unknown argument '$1'" >&2; exit 2 ;;
	esac
done

# The same guest for both: base initramfs (init + busybox), no XSAVE (see
# docs/pvm-backend.md), 512 MiB, one vCPU.
kernel=$out/bzImage
initrd=$out/initramfs-base.cpio
cmdline="console=ttyS0 noxsave"
memory=512M
marker="Run /init as init process"

[[ -f $kernel && -f $initrd ]] || "$here/build.sh"
command -v qemu-system-x86_64 >/dev/null || {
	export DEBIAN_FRONTEND=noninteractive
	apt-get -q install -y --no-install-recommends qemu-system-x86 >/dev/null 2>&1 ||
		{ apt-get -q update >/dev/null && apt-get -q install -y --no-install-recommends qemu-system-x86 >/dev/null; }
}
cargo build --release -q -p vmm --manifest-path "$repo/Cargo.toml"
vmm=$repo/target/release/vmm
rm -rf "$work"
mkdir -p "$work"

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# measure NAME CMD...: runs CMD until it prints $marker, exits, dumps registers
# after a KVM emulation failure (QEMU's "Code=" line), or $limit passes.
# Sets result_secs (empty if the marker never came) and result_guest (printk time).
measure() {
	local name=$1 log=$work/$1.log start line now
	shift
	result_secs="" result_guest=""
	start=$EPOCHREALTIME
	exec {fd}< <(exec timeout --kill-after=5 "$limit" "$@" 2>&1 </dev/null)
	local pid=$!
	while IFS= read -r line <&"$fd"; do
		now=$EPOCHREALTIME
		printf '%s %s\n' "$(elapsed "$start" "$now")" "$line" >>"$log"
		if [[ $line == *"$marker"* ]]; then
			result_secs=$(elapsed "$start" "$now")
			result_guest=$(sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p' <<<"$line")
			break
		fi
		[[ $line == Code=* ]] && break
	done
	kill "$pid" 2>/dev/null || true
	exec {fd}<&-
	wait 2>/dev/null || true
}

report() { # NAME
	if [[ -n $result_secs ]]; then
		printf '%-5s /init after %8.1f s (guest printk time %s s)\n' "$1" "$result_secs" "$result_guest"
	else
		printf '%-5s did not reach /init (limit %s s); its last lines:\n' "$1" "$limit"
		grep -E 'KVM internal error|emulation failure|RIP=|Code=' "$work/$1.log" |
			tail -n 4 | cut -c1-160 | sed 's/^/      /'
		grep -qE 'KVM internal error|emulation failure|RIP=|Code=' "$work/$1.log" ||
			tail -n 4 "$work/$1.log" | cut -c1-160 | sed 's/^/      /'
	fi
}

measure vmm "$vmm" --kernel "$kernel" --initramfs "$initrd" --cmdline "$cmdline" \
	--memory "$memory" --cpus 1 --serial stdout
vmm_secs=$result_secs
report vmm

measure qemu qemu-system-x86_64 -accel kvm -m "$memory" -smp 1 -nographic -no-reboot \
	-kernel "$kernel" -initrd "$initrd" -append "$cmdline"
qemu_secs=$result_secs
report qemu

if [[ -n $vmm_secs && -n $qemu_secs ]]; then
	awk -v a="$vmm_secs" -v b="$qemu_secs" 'BEGIN { printf "ratio vmm/qemu = %.2f\n", a / b }'
else
	echo "ratio: not available (a VMM did not reach /init)"
fi
