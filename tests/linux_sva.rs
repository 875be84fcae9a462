//! SVA end to end in the default Linux guest (issue 7): with `--iommu --dsa`
//! Linux's intel-iommu and idxd drivers take the devices, accel-config sets
//! up a dedicated and a shared user work queue, and accel-config-test's
//! dsa_test copies memory through each from user space, MOVDIR64B and then
//! ENQCMD (IA32_PASID filled by the kernel's #GP fixup), translated by the
//! vIOMMU through the process's own page tables. Needs /dev/kvm and the
//! guest images (built by guest-images/build.sh when missing).

mod linux;

const SCRIPT: &str = "
accel-config config-engine dsa0/engine0.0 --group-id=0 &&
accel-config config-wq dsa0/wq0.0 --group-id=0 --mode=dedicated --type=user \
  --name=t-dwq --priority=10 --wq-size=16 --driver-name=user &&
accel-config config-wq dsa0/wq0.1 --group-id=0 --mode=shared --type=user \
  --name=t-swq --priority=10 --wq-size=16 --threshold=15 --driver-name=user &&
accel-config enable-device dsa0 &&
accel-config enable-wq dsa0/wq0.0 dsa0/wq0.1 || exit 10
t=/usr/libexec/accel-config/test/dsa_test
$t -w 0 -l 4096 -o 3 >/dev/null || exit 11
echo dwq-memmove-ok
$t -w 1 -l 4096 -o 3 >/dev/null || exit 12
echo swq-memmove-ok
";

#[test]
fn dsa_test_copies_through_dedicated_and_shared_user_wqs() {
    let out = linux::vmm_run_with(
        &linux::full_initramfs(),
        &[("RUST_LOG", "vmm::sva=info")],
        &[
            "--iommu",
            "--dsa",
            "--memory",
            "512M",
            "--timeout",
            "900",
            "--serial",
            "none",
        ],
        &["sh", "-c", SCRIPT],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.code, 0, "stdout:\n{stdout}\nstderr:\n{}", out.stderr);
    assert!(stdout.contains("dwq-memmove-ok\n"), "{stdout}");
    assert!(stdout.ends_with("swq-memmove-ok\n"), "{stdout}");
    // Each dsa_test process was bound with its own guest PASID, which the
    // VMM mapped to a host PASID of its own.
    let mappings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("vmm::sva") && l.contains(" -> host PASID "))
        .collect();
    assert_eq!(mappings.len(), 2, "{}", out.stderr);
}
