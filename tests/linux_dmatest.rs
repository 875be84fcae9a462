//! Linux's own DMA engine test (dmatest, built in) over idxd kernel work
//! queues in the default guest (issue 12): accel-config makes a dedicated
//! kernel WQ (descriptors submitted with MOVDIR64B at CPL0) and a shared one
//! (ENQCMDS at CPL0), the idxd dmaengine driver registers a channel for
//! each, and dmatest copies buffers of several sizes through both and
//! verifies them. Needs /dev/kvm and the guest images.

mod linux;

/// Buffer sizes copied, each through both channels. (On the PVM backend a
/// 64 KiB dmatest copy took about 17 s, so the sizes stop at 16 KiB.)
const SIZES: [u32; 4] = [64, 512, 4096, 16384];
/// Copies per size and channel.
const ITERATIONS: u32 = 4;

fn script() -> String {
    let sizes: Vec<String> = SIZES.iter().map(u32::to_string).collect();
    format!(
        "accel-config config-engine dsa0/engine0.0 --group-id=0 &&\n\
         accel-config config-wq dsa0/wq0.0 --group-id=0 --mode=dedicated --type=kernel \
           --name=dt0 --priority=10 --wq-size=16 --driver-name=dmaengine &&\n\
         accel-config config-wq dsa0/wq0.1 --group-id=0 --mode=shared --type=kernel \
           --name=dt1 --priority=10 --wq-size=16 --threshold=15 --driver-name=dmaengine &&\n\
         accel-config enable-device dsa0 &&\n\
         accel-config enable-wq dsa0/wq0.0 dsa0/wq0.1 || exit 10\n\
         cd /sys/module/dmatest/parameters &&\n\
         echo 1 >norandom && echo 5000 >timeout && echo {ITERATIONS} >iterations || exit 11\n\
         for s in {}; do for c in dma0chan0 dma0chan1; do\n\
         echo $s >test_buf_size && echo $c >channel && echo 1 >run && cat wait >/dev/null \
           || exit 12\n\
         done; done\n\
         dmesg | grep 'dmatest: dma0chan.*summary'\necho dmatest-done\n",
        sizes.join(" ")
    )
}

#[test]
fn dmatest_memcpy_over_dedicated_and_shared_kernel_wqs() {
    let out = linux::vmm_run_with(
        &linux::full_initramfs(),
        &[],
        &[
            "--iommu",
            "--dsa",
            "--memory",
            "512M",
            "--timeout",
            "1500",
            "--serial",
            "none",
        ],
        &["sh", "-c", &script()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.code, 0, "stdout:\n{stdout}\nstderr:\n{}", out.stderr);
    assert!(stdout.ends_with("dmatest-done\n"), "{stdout}");
    // "dmatest: dma0chan0-copy0: summary 8 tests, 0 failures ..."
    let summaries: Vec<&str> = stdout.lines().filter(|l| l.contains(" summary ")).collect();
    assert_eq!(summaries.len(), SIZES.len() * 2, "{stdout}");
    for chan in ["dma0chan0-copy0", "dma0chan1-copy0"] {
        let runs = summaries.iter().filter(|l| l.contains(chan)).count();
        assert_eq!(runs, SIZES.len(), "{chan}:\n{stdout}");
    }
    for line in summaries {
        assert!(
            line.contains(&format!("summary {ITERATIONS} tests, 0 failures")),
            "{line}\n{stdout}"
        );
    }
}
