//! Kernel modules for a modular (distribution) kernel in `vmm run`.
//!
//! `vmm run` needs the guest kernel to drive virtio-pci and virtio-console
//! (the command's output and status), and with `--share` FUSE and
//! virtio-fs. The project's kernel has them built in; a distribution
//! kernel usually has them as modules (Debian: all five). The VMM then
//! takes them from that kernel's own module tree (`--modules DIR`, else
//! `lib/modules/RELEASE` beside the kernel as `dpkg-deb -x` lays it out,
//! else the host's `/lib/modules/RELEASE`, as virtme-ng does), with their
//! dependencies from `modules.dep`, and appends them to the initramfs as a
//! second cpio archive: `/lib/modules/vmm/*.ko` and `/lib/modules/vmm/order`,
//! the load order that init follows before it looks for its consoles.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// What `vmm run` always needs from the kernel.
pub const CONSOLE_MODULES: &[&str] = &["virtio_pci", "virtio_console"];
/// What `--share` adds.
pub const SHARE_MODULES: &[&str] = &["virtiofs"];
/// Where init finds the modules in the guest.
pub const GUEST_DIR: &str = "lib/modules/vmm";
/// The file listing them in load order.
pub const ORDER_FILE: &str = "order";

/// Offset of the setup header's "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// Offset of `kernel_version` (a pointer to the version string, less 0x200).
const BZIMAGE_VERSION_PTR_OFFSET: u64 = 0x20e;
const BZIMAGE_SETUP_BASE: u64 = 0x200;

/// Errors finding or packing modules; each prints as one line.
#[derive(Debug, Error)]
pub enum ModulesError {
    /// `--modules` names no module tree.
    #[error("--modules: '{0}' is not a module tree (expected a lib/modules/RELEASE directory)")]
    NotATree(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ModulesError + '_ {
    move |source| ModulesError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The release string of a bzImage (`6.1.0-57-amd64`), from its setup
/// header's `kernel_version`; None for other files (an ELF vmlinux).
pub fn bzimage_release(kernel: &Path) -> Option<String> {
    let mut file = fs::File::open(kernel).ok()?;
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET)).ok()?;
    file.read_exact(&mut magic).ok()?;
    if &magic != b"HdrS" {
        return None;
    }
    let mut ptr = [0u8; 2];
    file.seek(SeekFrom::Start(BZIMAGE_VERSION_PTR_OFFSET))
        .ok()?;
    file.read_exact(&mut ptr).ok()?;
    let ptr = u16::from_le_bytes(ptr);
    if ptr == 0 {
        return None;
    }
    let mut version = [0u8; 128];
    file.seek(SeekFrom::Start(u64::from(ptr) + BZIMAGE_SETUP_BASE))
        .ok()?;
    let n = file.read(&mut version).ok()?;
    let text = String::from_utf8_lossy(&version[..n]);
    text.split(|c: char| c.is_whitespace() || c == '\0')
        .next()
        .filter(|r| !r.is_empty())
        .map(str::to_string)
}

/// The release of an uncompressed kernel (ELF vmlinux): the word after
/// its "Linux version " banner.
pub fn vmlinux_release(kernel: &Path) -> Option<String> {
    const BANNER: &[u8] = b"Linux version ";
    let bytes = fs::read(kernel).ok()?;
    if !bytes.starts_with(b"\x7fELF") {
        return None;
    }
    let at = bytes.windows(BANNER.len()).position(|w| w == BANNER)? + BANNER.len();
    let rest = &bytes[at..bytes.len().min(at + 128)];
    let end = rest.iter().position(|&b| b == b' ' || b == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned()).filter(|r| !r.is_empty())
}

/// The module tree for `kernel`: `given`, else beside the kernel
/// (`lib/modules/RELEASE` in the kernel's directory or its parent), else
/// the host's. None when the kernel's release is unknown or no tree exists (a
/// kernel with everything built in needs none).
pub fn find_tree(kernel: &Path, given: Option<&Path>) -> Result<Option<PathBuf>, ModulesError> {
    let is_tree = |dir: &Path| dir.join("modules.dep").is_file() || dir.join("kernel").is_dir();
    if let Some(dir) = given {
        return if is_tree(dir) {
            Ok(Some(dir.to_path_buf()))
        } else {
            Err(ModulesError::NotATree(dir.display().to_string()))
        };
    }
    let Some(release) = bzimage_release(kernel).or_else(|| vmlinux_release(kernel)) else {
        return Ok(None);
    };
    let dir = kernel.parent();
    let beside = [dir, dir.and_then(Path::parent)]
        .into_iter()
        .flatten()
        .map(|root| root.join("lib/modules").join(&release));
    let host = Path::new("/lib/modules").join(&release);
    Ok(beside.chain([host]).find(|dir| is_tree(dir)))
}

/// `name` as modules.dep spells module file names (`-` and `_` are the
/// same to the kernel).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Each module's file (relative to the tree) and the modules it needs
/// directly.
type ModuleIndex = HashMap<String, (String, Vec<String>)>;

/// The index from `modules.dep` (an installed tree: depmod wrote it).
fn index_from_modules_dep(deps: &str) -> ModuleIndex {
    deps.lines()
        .filter_map(|line| {
            let (path, needs) = line.split_once(':')?;
            let needs = needs.split_whitespace().map(module_name).collect();
            Some((module_name(path), (path.trim().to_string(), needs)))
        })
        .collect()
}

/// The index from the modules themselves, for a tree without modules.dep
/// (a package unpacked with `dpkg-deb -x`: depmod runs at install time):
/// every `*.ko` below `kernel/` and its `.modinfo` `depends=` list.
/// Compressed modules cannot be read this way and are left out.
fn index_from_modinfo(tree: &Path) -> Result<ModuleIndex, ModulesError> {
    let mut index = ModuleIndex::new();
    let mut dirs = vec![tree.join("kernel")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let path = entry.map_err(io_error(&dir))?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "ko") {
                continue;
            }
            let Ok(rel) = path.strip_prefix(tree) else {
                continue;
            };
            let rel = rel.to_string_lossy().into_owned();
            index.insert(module_name(&rel), (rel, Vec::new()));
        }
    }
    for (file, needs) in index.values_mut() {
        let path = tree.join(&*file);
        let bytes = fs::read(&path).map_err(io_error(&path))?;
        *needs = modinfo_depends(&bytes);
    }
    Ok(index)
}

/// The `depends=` entry of a module's `.modinfo` strings.
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &module[at + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// The files (relative to `tree`) to load for `wanted`, dependencies
/// first. A module that is built in or absent needs nothing.
pub fn load_order(tree: &Path, wanted: &[&str]) -> Result<Vec<String>, ModulesError> {
    let dep_path = tree.join("modules.dep");
    let index = if dep_path.is_file() {
        index_from_modules_dep(&fs::read_to_string(&dep_path).map_err(io_error(&dep_path))?)
    } else {
        index_from_modinfo(tree)?
    };
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for want in wanted {
        visit(&index, &want.replace('-', "_"), &mut seen, &mut order);
    }
    Ok(order)
}

/// Depth-first: a module after everything it needs.
fn visit(index: &ModuleIndex, name: &str, seen: &mut HashSet<String>, order: &mut Vec<String>) {
    if !seen.insert(name.to_string()) {
        return;
    }
    let Some((file, needs)) = index.get(name) else {
        log::debug!("module {name}: not in the tree (built in or absent)");
        return;
    };
    for need in needs {
        visit(index, need, seen, order);
    }
    order.push(file.clone());
}

/// A cpio "newc" archive being written (Linux's initramfs format; archives
/// may be concatenated).
pub struct Cpio {
    bytes: Vec<u8>,
    ino: u32,
}

impl Default for Cpio {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpio {
    const MAGIC: &'static str = "070701";
    /// Mode of a directory.
    pub const DIR: u32 = 0o040_755;
    /// Mode of a plain file.
    pub const FILE: u32 = 0o100_644;
    /// Mode of an executable file.
    pub const EXECUTABLE: u32 = 0o100_755;

    /// An empty archive.
    pub fn new() -> Self {
        Self {
            bytes: Vec::new(),
            ino: 1,
        }
    }

    fn pad(&mut self) {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }

    /// Adds `name` (no leading '/') with `mode` and contents `data`.
    pub fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.bytes.extend_from_slice(Self::MAGIC.as_bytes());
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// The archive's bytes, trailer included.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

/// A cpio archive with `files` (relative to `tree`) under [`GUEST_DIR`],
/// numbered in order, and the [`ORDER_FILE`] naming them.
pub fn modules_cpio(tree: &Path, files: &[String]) -> Result<Vec<u8>, ModulesError> {
    let mut cpio = Cpio::new();
    let mut path = String::new();
    for part in GUEST_DIR.split('/') {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(part);
        cpio.entry(&path, Cpio::DIR, &[]);
    }
    let mut order = String::new();
    for (i, file) in files.iter().enumerate() {
        let source = tree.join(file);
        let data = fs::read(&source).map_err(io_error(&source))?;
        let base = file.rsplit('/').next().unwrap_or(file);
        let name = format!("{GUEST_DIR}/{i:02}-{base}");
        cpio.entry(&name, Cpio::FILE, &data);
        order.push('/');
        order.push_str(&name);
        order.push('\n');
    }
    cpio.entry(
        &format!("{GUEST_DIR}/{ORDER_FILE}"),
        Cpio::FILE,
        order.as_bytes(),
    );
    Ok(cpio.finish())
}

/// An initramfs written for one run (`initramfs` with the modules
/// appended), removed when dropped.
pub struct CarriedInitramfs {
    path: PathBuf,
}

impl CarriedInitramfs {
    /// The combined file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CarriedInitramfs {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// If `kernel` has a module tree holding any of `wanted`, writes
/// `initramfs` followed by those modules (and their dependencies) to a
/// temporary file.
pub fn carry(
    kernel: &Path,
    initramfs: &Path,
    given_tree: Option<&Path>,
    wanted: &[&str],
) -> Result<Option<CarriedInitramfs>, ModulesError> {
    let Some(tree) = find_tree(kernel, given_tree)? else {
        return Ok(None);
    };
    let files = load_order(&tree, wanted)?;
    if files.is_empty() {
        return Ok(None);
    }
    log::info!(
        "carrying {} modules from {}: {}",
        files.len(),
        tree.display(),
        files.join(" ")
    );
    let mut base = fs::read(initramfs).map_err(io_error(initramfs))?;
    // The kernel unpacks concatenated archives; start ours aligned.
    base.resize(base.len().next_multiple_of(512), 0);
    base.extend(modules_cpio(&tree, &files)?);
    let path = std::env::temp_dir().join(format!(
        "vmm-{}-initramfs-with-modules.cpio",
        std::process::id()
    ));
    let carried = CarriedInitramfs { path };
    fs::File::create(carried.path())
        .and_then(|mut f| f.write_all(&base))
        .map_err(io_error(carried.path()))?;
    Ok(Some(carried))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dep: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmm-modules-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        fs::create_dir_all(dir.join("kernel")).unwrap();
        fs::write(dir.join("modules.dep"), dep).unwrap();
        dir
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let dir = tree(
            "kernel/virtio.ko:\n\
             kernel/virtio_pci_modern_dev.ko:\n\
             kernel/fs/fuse.ko:\n\
             kernel/virtio_ring.ko: kernel/virtio.ko\n\
             kernel/virtio_pci.ko: kernel/virtio_pci_modern_dev.ko kernel/virtio_ring.ko kernel/virtio.ko\n\
             kernel/virtio_console.ko: kernel/virtio_ring.ko kernel/virtio.ko\n\
             kernel/fs/virtiofs.ko: kernel/fs/fuse.ko kernel/virtio_ring.ko kernel/virtio.ko\n",
        );
        assert_eq!(
            load_order(
                &dir,
                &["virtio_pci", "virtio-console", "virtiofs", "absent"]
            )
            .unwrap(),
            [
                "kernel/virtio_pci_modern_dev.ko",
                "kernel/virtio.ko",
                "kernel/virtio_ring.ko",
                "kernel/virtio_pci.ko",
                "kernel/virtio_console.ko",
                "kernel/fs/fuse.ko",
                "kernel/fs/virtiofs.ko",
            ]
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn dependencies_from_modinfo_without_modules_dep() {
        let dir = tree("");
        fs::remove_file(dir.join("modules.dep")).unwrap();
        fs::create_dir_all(dir.join("kernel/fs")).unwrap();
        fs::write(dir.join("kernel/virtio.ko"), b"\x7fELF\0name=virtio\0").unwrap();
        fs::write(dir.join("kernel/fs/fuse.ko"), b"\0depends=\0name=fuse\0").unwrap();
        fs::write(
            dir.join("kernel/fs/virtiofs.ko"),
            b"\0depends=fuse,virtio\0name=virtiofs\0",
        )
        .unwrap();
        assert_eq!(
            load_order(&dir, &["virtiofs"]).unwrap(),
            [
                "kernel/fs/fuse.ko",
                "kernel/virtio.ko",
                "kernel/fs/virtiofs.ko"
            ]
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn cpio_layout() {
        let dir = tree("kernel/a.ko:\n");
        fs::write(dir.join("kernel/a.ko"), b"MOD").unwrap();
        let cpio = modules_cpio(&dir, &["kernel/a.ko".into()]).unwrap();
        let text = String::from_utf8_lossy(&cpio);
        assert!(cpio.starts_with(b"070701"));
        assert_eq!(cpio.len() % 4, 0);
        for name in [
            "lib\0",
            "lib/modules/vmm\0",
            "lib/modules/vmm/00-a.ko\0",
            "/lib/modules/vmm/00-a.ko\n",
            "TRAILER!!!\0",
        ] {
            assert!(text.contains(name), "{name:?} missing");
        }
        let _ = fs::remove_dir_all(dir);
    }
}
