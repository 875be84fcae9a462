#!/usr/bin/env bash
# Boot-to-command time of the default guest on this project's VMM and, in the same
# run, on QEMU (Debian's qemu-system-x86, -accel kvm, direct kernel boot, the smallest
# machine: microvm) with the same kernel, initramfs and command line; prints both,
# with the time to "Run /init", and the ratio of the medians.
#
# Usage: boot-bench.sh [--bed] [--runs N] [--limit SECONDS] [--machine microvm|pc] [--vmm PATH]
#   (default)  on this machine's /dev/kvm
#   --bed      inside L1 of the nested ordinary-KVM bed (bed/run.sh): an ordinary KVM
#              (AMD SVM); QEMU, its firmware and this VMM run there side by side
#   --runs N   boots per VMM, alternating (default: 1, or 5 with --bed)
#   --limit S  seconds one boot may take (default 300)
#   --vmm PATH this vmm binary as it is (default: cargo build --release)
# Logs: out/boot-bench/{vmm,qemu}-N.log, each line prefixed with seconds since launch.
#
# The clock is the wall clock from launching the VMM process to the guest's command
# printing its line; the guest's own printk time of "Run /init" is shown beside it.
# Machines here are noisy: compare the ratio, not the seconds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
out=$here/out
work=$out/boot-bench
limit=300
runs=""
bed=0
machine=microvm
vmm=""
# Set inside the bed: measure here, build and fetch nothing.
inner=0
while (($#)); do
	case $1 in
	--bed) bed=1; shift ;;
	--runs) runs=${2:?--runs needs a number}; shift 2 ;;
	--limit) limit=${2:?--limit needs seconds}; shift 2 ;;
	--machine) machine=${2:?--machine needs microvm or pc}; shift 2 ;;
	--vmm) vmm=${2:?--vmm needs a path}; shift 2 ;;
	--inner) inner=1; shift ;;
	*) echo "boot-bench: unknown argument '$1'" >&2; exit 2 ;;
	esac
done
[[ -n $runs ]] || { [[ $bed == 1 ]] && runs=5 || runs=1; }
case $machine in
microvm | pc) ;;
*) echo "boot-bench: --machine must be microvm or pc, not '$machine'" >&2; exit 2 ;;
esac

# The same guest for both: base initramfs (init + busybox), 512 MiB, one vCPU. The
# command prints a line that is not on the command line itself (the kernel echoes
# that); the VMM adds the kernel parameters its platform needs on its own.
kernel=$out/bzImage
initrd=$out/initramfs-base.cpio
cmdline="console=ttyS0 -- vmm.cmd=sh,-c,echo%20boot-bench-%24%28%286%2A7%29%29 vmm.out=console"
marker="boot-bench-42"
init_marker="Run /init as init process"
memory=512M

if [[ $inner == 0 ]]; then
	[[ -f $kernel && -f $initrd ]] || "$here/build.sh" --quiet >/dev/null
	if [[ -z $vmm ]]; then
		cargo build --release -q --bin vmm --manifest-path "$repo/Cargo.toml"
		vmm=$repo/target/release/vmm
	fi
	vmm=$(realpath "$vmm")
	if [[ $bed == 1 ]]; then
		# QEMU comes from the bed's setup (bookworm-backports); it, its firmware and
		# this script (run by the host's bash) go into L1 at their own paths.
		qemu=$(bash "$repo/bed/setup.sh" --quiet | sed -n 's/^qemu=//p')
		bed_out=$out/boot-bench-bed
		status=0
		bash "$repo/bed/run.sh" --out "$bed_out" --include "$vmm" --include "$kernel" \
			--include "$initrd" --include "$qemu" --include /usr/share/seabios \
			--include /usr/share/qemu/qboot.rom --include /usr/share/qemu/linuxboot_dma.bin \
			--include /usr/share/qemu/kvmvapic.bin --include "$(command -v bash)" \
			--include "$here/boot-bench.sh" -- \
			"$(command -v bash) $here/boot-bench.sh --inner --vmm $vmm --runs $runs --limit $limit --machine $machine" ||
			status=$?
		cat "$bed_out/1.stdout" 2>/dev/null || true
		cat "$bed_out/1.stderr" >&2 2>/dev/null || true
		[[ $status == 0 ]] || exit "$status"
		exit "$(cat "$bed_out/1.status")"
	fi
	command -v qemu-system-x86_64 >/dev/null || {
		export DEBIAN_FRONTEND=noninteractive
		apt-get -q install -y --no-install-recommends qemu-system-x86 >/dev/null 2>&1 ||
			{ apt-get -q update >/dev/null && apt-get -q install -y --no-install-recommends qemu-system-x86 >/dev/null; }
	}
fi
rm -rf "$work"
mkdir -p "$work"

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# measure LOG CMD...: runs CMD until it prints $marker, exits, dumps registers after
# a KVM emulation failure (QEMU's "Code=" line), or $limit passes. Sets result_secs
# (empty if the marker never came) and result_init (guest printk time of /init).
measure() {
	local log=$work/$1.log start line now
	shift
	result_secs="" result_init=""
	start=$EPOCHREALTIME
	exec {fd}< <(exec timeout -k 5 "$limit" "$@" 2>&1 </dev/null)
	local pid=$!
	while IFS= read -r line <&"$fd"; do
		now=$EPOCHREALTIME
		line=${line%$'\r'}
		printf '%s %s\n' "$(elapsed "$start" "$now")" "$line" >>"$log"
		if [[ $line == *"$init_marker"* ]]; then
			result_init=$(sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p' <<<"$line")
		fi
		if [[ $line == "$marker" ]]; then
			result_secs=$(elapsed "$start" "$now")
			break
		fi
		[[ $line == Code=* ]] && break
	done
	kill "$pid" 2>/dev/null || true
	exec {fd}<&-
	wait 2>/dev/null || true
}

# One line per boot; failures show the log's last lines.
report() { # NAME RUN
	local log=$work/$1-$2.log
	if [[ -n $result_secs ]]; then
		printf '%-5s run %d: command after %7.2f s (Run /init at guest time %s s)\n' \
			"$1" "$2" "$result_secs" "${result_init:-?}"
	else
		printf '%-5s run %d: no command output (limit %s s); its last lines:\n' "$1" "$2" "$limit"
		{ grep -E 'KVM internal error|emulation failure|RIP=|Code=' "$log" || true; } |
			tail -n 4 | cut -c1-160 | sed 's/^/      /'
		grep -qE 'KVM internal error|emulation failure|RIP=|Code=' "$log" ||
			tail -n 4 "$log" | cut -c1-160 | sed 's/^/      /'
	fi
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

qemu_machine=(-M "$machine")
[[ $machine == pc ]] && qemu_machine=(-M pc -vga none)
vmm_times=()
qemu_times=()
for ((r = 1; r <= runs; r++)); do
	measure "vmm-$r" "$vmm" --kernel "$kernel" --initramfs "$initrd" --cmdline "$cmdline" \
		--memory "$memory" --cpus 1 --serial stdout
	report vmm "$r"
	[[ -n $result_secs ]] && vmm_times+=("$result_secs")
	measure "qemu-$r" qemu-system-x86_64 -accel kvm -cpu host "${qemu_machine[@]}" -m "$memory" \
		-smp 1 -nodefaults -no-user-config -display none -serial stdio -no-reboot \
		-kernel "$kernel" -initrd "$initrd" -append "$cmdline"
	report qemu "$r"
	[[ -n $result_secs ]] && qemu_times+=("$result_secs")
done

if [[ ${#vmm_times[@]} -gt 0 && ${#qemu_times[@]} -gt 0 ]]; then
	vmm_median=$(printf '%s\n' "${vmm_times[@]}" | median)
	qemu_median=$(printf '%s\n' "${qemu_times[@]}" | median)
	printf 'median boot-to-command: vmm %.2f s (%d of %d), qemu -M %s %.2f s (%d of %d)\n' \
		"$vmm_median" "${#vmm_times[@]}" "$runs" "$machine" "$qemu_median" "${#qemu_times[@]}" "$runs"
	awk -v a="$vmm_median" -v b="$qemu_median" 'BEGIN { printf "ratio vmm/qemu = %.2f\n", a / b }'
else
	echo "ratio: not available (a VMM never ran the command)"
	exit 1
fi
