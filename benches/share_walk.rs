//! A `git status`-sized tree walk through a virtio-fs share, measured in the
//! guest (its /proc/uptime, 10 ms steps) in one `vmm run`: `find` (names
//! only) and `ls -lR` (an lstat of every entry, what `git status` does)
//! over the share, then the same `ls -lR` over a copy of the tree in the
//! guest's own RAM file system. Prints the times and the share/RAM ratio.
//! Not a criterion bench: one guest boot takes minutes on some KVMs.
//!
//! `cargo bench -p vmm-sva --bench share_walk` (FILES=n to change the size).

#[path = "../tests/linux/mod.rs"]
mod linux;

/// Files per directory.
const PER_DIR: usize = 50;

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let files: usize = std::env::var("FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let tree = std::env::temp_dir().join(format!("vmm-share-walk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tree);
    for i in 0..files {
        let dir = tree.join(format!("d{:03}", i / PER_DIR));
        if i % PER_DIR == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        std::fs::write(dir.join(format!("f{i:05}.c")), format!("int f{i};\n")).unwrap();
    }
    let script = "up() { read t _ < /proc/uptime; echo \"T $t\"; }; \
                  up; find /w -type f | wc -l; up; ls -lR /w | wc -l; up; \
                  mkdir -p /tmp; cp -a /w /tmp/w; up; ls -lR /tmp/w | wc -l; up";
    let (_, initramfs) = linux::guest_images();
    let vfsd = linux::virtiofsd();
    let share = format!("{}:/w", tree.display());
    let run = linux::vmm_run_with(
        &initramfs,
        &[],
        &[
            "--timeout",
            "1800",
            "--serial",
            "none",
            "--virtiofsd",
            vfsd.to_str().unwrap(),
            "--share",
            &share,
        ],
        &["sh", "-c", script],
    );
    let _ = std::fs::remove_dir_all(&tree);
    let out = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.code, 0, "stdout: {out}\nstderr: {}", run.stderr);
    let t: Vec<f64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("T ")?.parse().ok())
        .collect();
    let counts: Vec<&str> = out.lines().filter(|l| !l.starts_with("T ")).collect();
    assert_eq!(t.len(), 5, "{out}");
    assert_eq!(
        counts.first().map(|c| c.trim()),
        Some(files.to_string().as_str()),
        "{out}"
    );
    let (find, lslr, copy, ram) = (t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3]);
    let dirs = files.div_ceil(PER_DIR);
    println!("share_walk: {files} files in {dirs} directories, one vCPU, guest clock");
    println!(
        "share_walk: find over virtio-fs:   {find:.2} s ({:.0} us per file)",
        find * 1e6 / files as f64
    );
    println!(
        "share_walk: ls -lR over virtio-fs: {lslr:.2} s ({:.0} us per file)",
        lslr * 1e6 / files as f64
    );
    println!("share_walk: cp -a to guest RAM:    {copy:.2} s");
    println!("share_walk: ls -lR in guest RAM:   {ram:.2} s");
    println!(
        "share_walk: ls -lR virtio-fs / RAM ratio = {:.1}",
        lslr / ram.max(0.01)
    );
}
