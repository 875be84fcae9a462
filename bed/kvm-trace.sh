#!/bin/sh
# Runs COMMAND inside L1 with L1's KVM recording what it sees of its guests
# (the VMM's L2): every exit and entry, injected interrupts, MMIO, nested
# page-table changes, and on Debian's 6.1.0-57 kernel the VMCB's CR3, CR0,
# CR4, RIP, CR2, CPL, nested CR3, EVENTINJ and EXITINTINFO at every VMRUN
# and every exit (kprobes). After COMMAND it prints how many exits the
# trace holds (all, to user space, MMIO); when COMMAND fails, also the
# 1,500 trace lines before L2's last shutdown exit (a guest triple fault)
# and the trace's tail, so a failure in the bed says what L2's CPU was
# given and where it stopped, which the VMM itself cannot see (SVM resets a
# vCPU that shuts down; the CR2 of the shutdown exit is the address of the
# last fault). Exits with COMMAND's status.
#
# Usage, from the host:
#   bed/run.sh --include bed/kvm-trace.sh [--include ...] -- \
#       "$PWD/bed/kvm-trace.sh COMMAND ARGS..."
# (busybox sh in L1; needs root there, which bed/run.sh gives).

T=/sys/kernel/tracing
[ -e $T/trace ] || mount -t tracefs nodev $T || exit 2
echo 0 > $T/tracing_on
echo > $T/trace
# Per CPU: the last few hundred thousand events.
echo 32768 > $T/buffer_size_kb
echo 1 > $T/events/kvm/enable
for e in kvm_tdp_mmu_spte_changed kvm_mmu_zap_all_fast kvm_mmu_prepare_zap_page; do
	[ -e $T/events/kvmmmu/$e/enable ] && echo 1 > $T/events/kvmmmu/$e/enable
done

# The VMCB's guest state at each VMRUN (svm_vcpu_run) and exit
# (svm_handle_exit). Their argument is the vCPU, whose struct vcpu_svm keeps
# its VMCB pointer at byte 6552 in this kernel's kvm-amd (read from the
# module's BTF); in the VMCB (AMD APM vol. 2, appendix B) EXITINTINFO is at
# 0x88, EVENTINJ at 0xa8 and nested_cr3 at 0xb0, and the save area's CPL,
# CR4, CR3, CR0, RIP and CR2 at 0x4cb, 0x548, 0x550, 0x558, 0x578 and
# 0x640. Another kernel has another layout: no probes there.
if [ "$(uname -r)" = 6.1.0-57-amd64 ]; then
	V='+6552(%di)'
	state="cr3=+1360($V):x64 ncr3=+176($V):x64 cr0=+1368($V):x64 cr4=+1352($V):x64 rip=+1400($V):x64 cr2=+1600($V):x64 cpl=+1227($V):u8 inj=+168($V):x32 eii=+136($V):x32"
	grep -q '^p:kvmprobe/svm_entry ' $T/kprobe_events ||
		echo "p:kvmprobe/svm_entry svm_vcpu_run $state" >> $T/kprobe_events
	grep -q '^p:kvmprobe/svm_exit ' $T/kprobe_events ||
		echo "p:kvmprobe/svm_exit svm_handle_exit $state" >> $T/kprobe_events
	echo 1 > $T/events/kvmprobe/enable
else
	echo "kvm-trace.sh: no VMCB probes for kernel $(uname -r)" >&2
fi

echo 1 > $T/tracing_on
"$@"
status=$?
echo 0 > $T/tracing_on
# One pass over the trace (reading it costs seconds under TCG).
awk '!/^#/ && match($0, /[0-9]+\.[0-9]+:/) {
		t = substr($0, RSTART, RLENGTH - 1); if (first == "") first = t; last = t }
	/kvm_exit:/ { exits++ }
	/kvm_userspace_exit/ { user++ }
	/KVM_EXIT_MMIO/ { mmio++ }
	END { printf "=== L1 KVM trace, %s to %s s: %d exits, %d to user space (%d MMIO)\n",
		first, last, exits, user, mmio }' $T/trace
if [ $status != 0 ]; then
	echo "=== L1 KVM trace: the 1,500 events before L2's shutdown exit (status $status)"
	grep -B 1500 -A 3 'reason shutdown' $T/trace | tail -n 1504
	echo "=== L1 KVM trace: its last 300 events"
	tail -n 300 $T/trace
fi
exit $status
