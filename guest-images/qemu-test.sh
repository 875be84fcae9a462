#!/usr/bin/env bash
# Boots the guest images from build.sh under QEMU (TCG, no KVM needed) and checks
# the init protocol of README.md: command line encoding, output on the virtio
# console, exit status trailer, power-off, serial fallback, panic behaviour.
# This tests the images independently of the project's VMM.
# Usage: qemu-test.sh [--keep]   (logs in out/qemu-test/)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$here/out
work=$out/qemu-test
timeout_s=${QEMU_TEST_TIMEOUT:-600}

command -v qemu-system-x86_64 >/dev/null || {
	DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends qemu-system-x86 \
		>/dev/null 2>&1 || { apt-get -q update >/dev/null && DEBIAN_FRONTEND=noninteractive \
			apt-get -q install -y --no-install-recommends qemu-system-x86 >/dev/null; }
}
for f in bzImage initramfs.cpio initramfs-base.cpio; do
	[[ -f $out/$f ]] || { echo "qemu-test: $out/$f missing: run build.sh first" >&2; exit 1; }
done
rm -rf "$work"
mkdir -p "$work"

# The encoding of README.md: argv elements joined by ',', every byte outside
# [A-Za-z0-9._/:=+@^-] written as %XX.
vmm_encode_argv() {
	local LC_ALL=C arg sep="" i c enc
	for arg in "$@"; do
		enc=""
		for ((i = 0; i < ${#arg}; i++)); do
			c=${arg:i:1}
			case $c in
			[A-Za-z0-9._/:=+@^-]) enc+=$c ;;
			*) enc+=$(printf '%%%02X' "'$c") ;;
			esac
		done
		printf '%s%s' "$sep" "$enc"
		sep=,
	done
}

passed=0
failed=0
check() { # name, condition result (0 = ok), detail
	if [[ $2 == 0 ]]; then
		passed=$((passed + 1))
		echo "ok   $1"
	else
		failed=$((failed + 1))
		echo "FAIL $1: $3"
	fi
}

# run NAME INITRAMFS VIRTIO CMDLINE -- ARGV...   (@CMD@ in CMDLINE: the encoded ARGV)
# VIRTIO: 0 no virtio console, 1 its output to NAME.hvc, 2 a pipe pair NAME.pipe.{in,out},
# 3 as 1 plus a second console device whose output goes to NAME.status
# Leaves $work/NAME.serial, $work/NAME.hvc, $work/NAME.rc, $work/NAME.secs
run_guest() {
	local name=$1 initrd=$2 virtio=$3 cmdline=$4
	shift 5
	local enc dev=() t0
	enc=$(vmm_encode_argv "$@")
	case $virtio in
	1 | 3) dev=(-chardev "file,id=hvc,path=$work/$name.hvc") ;;
	2) dev=(-chardev "pipe,id=hvc,path=$work/$name.pipe") ;;
	esac
	# shellcheck disable=SC2054 # commas belong to QEMU's option syntax
	[[ $virtio == 0 ]] || dev+=(-device virtio-serial-pci,id=vser
		-device virtconsole,chardev=hvc,bus=vser.0,nr=0)
	# A second console device for the status line (hvc1), as the project's VMM has.
	# shellcheck disable=SC2054
	[[ $virtio != 3 ]] || dev+=(-chardev "file,id=st,path=$work/$name.status"
		-device virtio-serial-pci,id=vser2 -device virtconsole,chardev=st,bus=vser2.0,nr=0)
	[[ $virtio == 2 ]] || : >"$work/$name.hvc"
	t0=$(date +%s.%N)
	set +e
	timeout "$timeout_s" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 512 \
		-machine q35 -device intel-iommu,intremap=off,x-scalable-mode=on \
		-display none -no-reboot -serial "file:$work/$name.serial" -monitor none \
		"${dev[@]}" -kernel "$out/bzImage" -initrd "$out/$initrd" \
		-append "${cmdline//@CMD@/$enc}" >"$work/$name.qemu" 2>&1
	echo $? >"$work/$name.rc"
	set -e
	echo "$(date +%s.%N) - $t0" | bc >"$work/$name.secs"
}

std="console=ttyS0 panic=-1"
trailer() { tail -c 200 "$1" | grep -a -o 'VMM-EXIT-STATUS=[0-9]*' | tail -n1 | cut -d= -f2; }

# 1. Exit status and exact output over the virtio console; quotes, spaces, %, comma
#    and a non-ASCII byte survive the command-line encoding.
run_guest status initramfs-base.cpio 1 "$std -- vmm.cmd=@CMD@" -- sh -c 'printf "%s|" "$@"; echo; exit 7' sh 'a b' '"q"' "it's" '50%' 'x,y' $'\xc3\xa9'
expect=$(printf '%s|' 'a b' '"q"' "it's" '50%' 'x,y' $'\xc3\xa9'; printf '\n\nVMM-EXIT-STATUS=7\n')
got=$(cat "$work/status.hvc"; echo .)
check "exit status 7 and byte-exact output on hvc0" "$([[ ${got%.} == "$expect"$'\n' ]] && echo 0 || echo 1)" \
	"got $(od -c "$work/status.hvc" | head -n5)"
check "QEMU ended by guest power-off (exit 0)" "$(cat "$work/status.rc")" "qemu rc $(cat "$work/status.rc")"
check "kernel banner on the serial console" "$(grep -q 'Linux version 6.12' "$work/status.serial"; echo $?)" ""
check "init's human-readable status line on serial" \
	"$(grep -q 'init: vmm.cmd exited with status 7' "$work/status.serial"; echo $?)" ""

# 2. The full image: accel-config and its libraries, bash, idxd and IOMMU messages.
# shellcheck disable=SC2016 # the script is for the guest's shell
run_guest full initramfs.cpio 1 "$std -- vmm.cmd=@CMD@" -- sh -c '
	accel-config --version || exit 10
	bash -c "echo bash \$BASH_VERSION" || exit 11
	/usr/libexec/accel-config/test/dsa_test -h >/dev/null 2>&1; echo "dsa_test rc $?"
	ls /sys/bus/dsa >/dev/null || exit 12
	dmesg | grep -i -e idxd -e dmar -e iommu -e "Run /init"
	grep -o -w -e movdir64b -e enqcmd /proc/cpuinfo | sort -u
	exit 0'
check "full image: command ran, status 0" "$([[ $(trailer "$work/full.hvc") == 0 ]] && echo 0 || echo 1)" \
	"$(tail -n 20 "$work/full.hvc")"
check "full image: accel-config runs" "$(grep -qE '^[0-9]+\.[0-9]' "$work/full.hvc"; echo $?)" ""
check "full image: bash runs" "$(grep -q '^bash 5' "$work/full.hvc"; echo $?)" ""
check "full image: /sys/bus/dsa exists (idxd bus registered)" \
	"$([[ $(trailer "$work/full.hvc") != 12 ]] && echo 0 || echo 1)" ""
check "full image: DMAR (intel-iommu) initialised" "$(grep -qi 'DMAR' "$work/full.hvc"; echo $?)" ""

# 3. No virtio console: output and trailer go to the serial console.
run_guest serial initramfs-base.cpio 0 "$std -- vmm.cmd=@CMD@" -- sh -c 'echo on-serial; exit 3'
check "fallback to serial console" "$(grep -q '^on-serial' "$work/serial.serial" &&
	[[ $(grep -a -o 'VMM-EXIT-STATUS=[0-9]*' "$work/serial.serial" | tail -n1) == VMM-EXIT-STATUS=3 ]]; echo $?)" \
	"$(tail -n 5 "$work/serial.serial")"

# 4. Command not found: 127. Killed by a signal: 128+n.
run_guest notfound initramfs-base.cpio 1 "$std -- vmm.cmd=@CMD@" -- no-such-program
check "missing program gives 127" "$([[ $(trailer "$work/notfound.hvc") == 127 ]] && echo 0 || echo 1)" \
	"$(cat "$work/notfound.hvc")"
run_guest signal initramfs-base.cpio 1 "$std -- vmm.cmd=@CMD@" -- sh -c 'kill -TERM $$'
check "signal gives 128+n" "$([[ $(trailer "$work/signal.hvc") == 143 ]] && echo 0 || echo 1)" \
	"$(cat "$work/signal.hvc")"

# 5. Panic through sysrq: immediate reboot (QEMU -no-reboot exits), no trailer.
run_guest panic initramfs-base.cpio 1 "$std -- vmm.cmd=@CMD@" -- sh -c 'echo c > /proc/sysrq-trigger; sleep 5'
check "sysrq panic: 'Kernel panic' on serial, no exit status" "$(grep -q 'Kernel panic' "$work/panic.serial" &&
	[[ -z $(trailer "$work/panic.hvc") ]]; echo $?)" "$(tail -n 5 "$work/panic.serial")"
check "sysrq panic: reboot at once (QEMU exit 0 with -no-reboot, before timeout)" "$(cat "$work/panic.rc")" ""

# 6. Settings before "--" (read from /proc/cmdline); vmm.exit=reboot resets instead
#    of powering off (QEMU's -no-reboot turns the reset into an exit as well).
run_guest reboot initramfs-base.cpio 1 "$std vmm.cmd=@CMD@ vmm.exit=reboot vmm.out=hvc0" -- sh -c 'echo via-proc-cmdline'
check "settings from /proc/cmdline, vmm.exit=reboot" "$([[ $(head -n1 "$work/reboot.hvc") == via-proc-cmdline &&
	$(trailer "$work/reboot.hvc") == 0 ]] && grep -q 'reboot: Restarting system' "$work/reboot.serial"; echo $?)" \
	"$(cat "$work/reboot.hvc"; tail -n 3 "$work/reboot.serial")"

# 7. vmm.stdin=console: the command reads the virtio console (QEMU pipe chardev),
#    which is its controlling terminal; the trailer still follows its output.
mkfifo "$work/stdin.pipe.in" "$work/stdin.pipe.out"
cat "$work/stdin.pipe.out" >"$work/stdin.hvc" &
reader=$!
(sleep 5 && printf 'hello world\n' >"$work/stdin.pipe.in") &
writer=$!
# shellcheck disable=SC2016 # the script is for the guest's shell
run_guest stdin initramfs-base.cpio 2 "$std -- vmm.cmd=@CMD@ vmm.stdin=console vmm.out=hvc0" -- \
	sh -c 'read x; echo "got:$x"; tty; exit 4'
wait "$writer" || true
wait "$reader" || true
check "vmm.stdin=console: input, controlling tty, status" \
	"$([[ $(cat "$work/stdin.hvc") == $'got:hello world\n/dev/hvc0\n\nVMM-EXIT-STATUS=4' ]] && echo 0 || echo 1)" \
	"$(od -c "$work/stdin.hvc" | head -n 5)"

# 8. vmm.status=hvc1: the status line on a console of its own, the output device
#    carrying exactly what the command wrote.
run_guest statusport initramfs-base.cpio 3 "$std -- vmm.cmd=@CMD@ vmm.out=hvc0 vmm.status=hvc1" -- \
	sh -c 'printf "exact, no newline"; exit 5'
check "vmm.status=hvc1: output alone on hvc0, status on hvc1" \
	"$([[ $(cat "$work/statusport.hvc"; echo .) == 'exact, no newline.' &&
		$(cat "$work/statusport.status") == $'\nVMM-EXIT-STATUS=5' ]] && echo 0 || echo 1)" \
	"hvc0: $(od -c "$work/statusport.hvc" | head -n 3) hvc1: $(od -c "$work/statusport.status" | head -n 3)"

for n in status full serial notfound signal panic reboot stdin statusport; do
	printf 'qemu-test: %-9s %6.1f s\n' "$n" "$(cat "$work/$n.secs")"
done
echo "$passed passed, $failed failed"
[[ $failed == 0 ]]
