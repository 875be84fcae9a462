#!/usr/bin/env bash
# The main job: the accelerator working in guests on this VMM.
#  1. A micro-guest on a machine with the vIOMMU and a vDSA: its kernel builds
#     scalable-mode VT-d tables and brings the vDSA up, its user process copies
#     with MOVDIR64B and ENQCMD; the VMM prints the copies and the guest-to-host
#     PASID translation.
#  2. The default Linux guest (Debian's linux-source-6.12, busybox and
#     accel-config, built by guest-images/build.sh and cached after the first
#     run), booted with the same devices. The kernel's intel-iommu and idxd
#     drivers take them; inside the guest accel-config sets up a dedicated and
#     a shared work queue for user space and accel-config-test's dsa_test copies
#     memory through each (MOVDIR64B, then ENQCMD with the kernel's #GP fixup
#     of IA32_PASID), through SVA: the process's own page tables, via the vIOMMU.
#     The guest reads those commands (demo/sva-guest.sh) from this checkout's
#     demo/ directory, shared read-only over virtio-fs (virtiofsd, installed
#     and cached by tools/virtiofsd.sh).
# Usage: ./demo.sh [--micro-only]
set -euo pipefail
cd "$(dirname "$0")"

cargo build --release -q --bin vmm
vmm=target/release/vmm

echo "== micro-guest: SVA copy through the vIOMMU and the vDSA"
"$vmm" micro sva-demo
[[ ${1:-} == --micro-only ]] && exit 0

echo
echo "== Linux guest: building the default image and virtiofsd (cached after the first run)"
guest-images/build.sh --quiet >/dev/null
virtiofsd=$(tools/virtiofsd.sh --quiet)
serial=guest-images/out/demo-serial.log
echo "== Linux guest: booting with --iommu --dsa (kernel log in $serial)"
status=0
RUST_LOG=vmm::sva=info "$vmm" run --kernel guest-images/out/vmlinux \
	--initramfs guest-images/out/initramfs.cpio --memory 512M --iommu --dsa \
	--timeout 900 --serial "file:$serial" --virtiofsd "$virtiofsd" \
	--share "$PWD/demo" -- sh "$PWD/demo/sva-guest.sh" \
	2> >(sed -n 's/.*INFO  vmm::sva[^]]*\] /vmm: /p' >&2) || status=$?
echo "== the guest kernel's banner and what its drivers found:"
grep -m1 -o 'Linux version [^ ]* ([^)]*)' "$serial" || true
grep -E 'DMAR: (dmar0|Intel)|idxd .*Accelerator' "$serial" | sed 's/^\[ *[0-9.]*\] //' || true
echo "== vmm run exit status: $status"
exit "$status"
