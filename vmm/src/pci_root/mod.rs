//! The PCIe root complex: configuration access through ECAM (MMCONFIG) and
//! the legacy 0xCF8/0xCFC ports, BAR assignment, and dispatch of memory
//! accesses to the BAR that decodes them.
//!
//! Topology: one segment, one bus (bus 0). A host bridge sits at 00:00.0 and
//! every function added with [`PciRoot::add_device`] is a single-function
//! device on bus 0 (a root-complex integrated endpoint, as the vDSA must be
//! for Linux to enable PASID on it; see the guest requirements, §0.4).
//!
//! The machine registers three bus devices, all views of the same root:
//!
//! | bus device            | bus      | range                                        |
//! | --------------------- | -------- | -------------------------------------------- |
//! | [`PciEcam`]           | MMIO     | `PCIE_ECAM_START`, `PCIE_ECAM_SIZE`          |
//! | [`PciConfigIo`]       | port I/O | `PCI_CONFIG_ADDRESS_PORT`, [`PciConfigIo::PORT_COUNT`] |
//! | [`PciMmioWindows`]    | MMIO     | `PCI_MMIO32_START`/`SIZE` and `PCI_MMIO64_START`/`SIZE` (one instance, two ranges) |
//!
//! All of them may be called from several vCPU threads at once: the root
//! keeps its function table and BAR map behind read-write locks and each
//! function behind its own mutex.

mod bar_window;
mod config_io;
mod ecam;
mod host_bridge;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use log::{debug, warn};
use pci::header::{bar, command, offset};
use pci::{MappedBar, PciAddress, PciDevice, BAR_COUNT, DEVICES_PER_BUS, FUNCTIONS_PER_DEVICE};
use thiserror::Error;

use crate::layout;

pub use bar_window::PciMmioWindows;
pub use config_io::PciConfigIo;
pub use ecam::PciEcam;
pub use host_bridge::HostBridge;

/// Device/function slots on one bus.
const DEVFN_COUNT: usize = DEVICES_PER_BUS as usize * FUNCTIONS_PER_DEVICE as usize;

/// Errors adding a function to the root complex.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciRootError {
    /// Every device number on bus 0 is taken.
    #[error("PCI bus 0 has no free device number")]
    BusFull,
    /// A BAR does not fit in what is left of its MMIO window.
    #[error("no room for BAR {bar} ({size:#x} bytes) of {bdf} in the {window} MMIO window")]
    WindowFull {
        /// The function.
        bdf: PciAddress,
        /// The BAR register index.
        bar: u8,
        /// The BAR size.
        size: u64,
        /// "32-bit" or "64-bit".
        window: &'static str,
    },
}

/// A shareable PCI function.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// A memory BAR currently decoding, and the function that owns it.
#[derive(Clone)]
struct BarRoute {
    devfn: u8,
    bar: MappedBar,
    device: SharedPciDevice,
}

impl BarRoute {
    /// The offset of `[addr, addr + len)` in this BAR, if it lies inside.
    fn offset_of(&self, addr: u64, len: usize) -> Option<u64> {
        let offset = addr.checked_sub(self.bar.base)?;
        let end = offset.checked_add(len as u64)?;
        (end <= self.bar.size).then_some(offset)
    }
}

/// A bump allocator over one MMIO window.
#[derive(Debug)]
struct WindowAllocator {
    name: &'static str,
    next: u64,
    end: u64,
}

impl WindowAllocator {
    fn new(name: &'static str, start: u64, size: u64) -> Self {
        Self {
            name,
            next: start,
            end: start + size,
        }
    }

    /// Takes a naturally aligned range of `size` (a power of two) bytes.
    fn allocate(&mut self, size: u64) -> Option<u64> {
        let base = self.next.checked_next_multiple_of(size)?;
        let end = base.checked_add(size)?;
        (end <= self.end).then(|| {
            self.next = end;
            base
        })
    }
}

/// A memory BAR found by the sizing probe.
#[derive(Clone, Copy, Debug)]
struct ProbedBar {
    index: u8,
    size: u64,
    is_64bit: bool,
}

struct Shared {
    /// Functions on bus 0, indexed by devfn.
    functions: RwLock<Vec<Option<SharedPciDevice>>>,
    /// The memory BARs that decode now.
    routes: RwLock<Vec<BarRoute>>,
    /// Allocators for the 32-bit and 64-bit windows.
    windows: Mutex<(WindowAllocator, WindowAllocator)>,
}

/// Locks a function; a function whose lock was poisoned by a panicking
/// thread is still used (its state is whatever the panic left).
fn lock(device: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The root complex; cheap to clone (all clones are the same root).
#[derive(Clone)]
pub struct PciRoot {
    shared: Arc<Shared>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let functions = self.functions_read();
        let present: Vec<PciAddress> = (0..DEVFN_COUNT)
            .filter(|&i| functions[i].is_some())
            .map(|i| PciAddress::from_devfn(i as u8))
            .collect();
        f.debug_struct("PciRoot")
            .field("functions", &present)
            .finish_non_exhaustive()
    }
}

impl PciRoot {
    /// A root complex with only the host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut functions = vec![None; DEVFN_COUNT];
        functions[0] = Some(Arc::new(Mutex::new(HostBridge::new())) as SharedPciDevice);
        Self {
            shared: Arc::new(Shared {
                functions: RwLock::new(functions),
                routes: RwLock::new(Vec::new()),
                windows: Mutex::new((
                    WindowAllocator::new(
                        "32-bit",
                        layout::PCI_MMIO32_START,
                        layout::PCI_MMIO32_SIZE,
                    ),
                    WindowAllocator::new(
                        "64-bit",
                        layout::PCI_MMIO64_START,
                        layout::PCI_MMIO64_SIZE,
                    ),
                )),
            }),
        }
    }

    /// Adds `device` as function 0 of the next free device number on bus 0.
    ///
    /// As firmware would, sizes its memory BARs, assigns each a naturally
    /// aligned address (64-bit BARs in the 64-bit window, 32-bit BARs in the
    /// 32-bit window, largest first) and enables memory decoding. I/O BARs
    /// are left unassigned: the machine has no PCI I/O window.
    pub fn add_device(&self, device: SharedPciDevice) -> Result<PciAddress, PciRootError> {
        // Hold the function table for the whole insertion so that two
        // concurrent callers cannot take the same slot.
        let mut functions = self
            .shared
            .functions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let bdf = first_free(&functions).ok_or(PciRootError::BusFull)?;
        let mapped = {
            let mut dev = lock(&device);
            let mut bars = probe_bars(&mut *dev, bdf);
            bars.sort_by_key(|bar| std::cmp::Reverse(bar.size));
            self.assign_bars(&mut *dev, bdf, &bars)?;
            let command = read_config_u16(&mut *dev, offset::COMMAND) | command::MEMORY_SPACE;
            dev.config_write(offset::COMMAND, &command.to_le_bytes());
            dev.mapped_bars()
        };
        functions[usize::from(bdf.devfn())] = Some(device.clone());
        drop(functions);
        self.update_routes(bdf.devfn(), &device, mapped);
        debug!("pci: added {bdf}");
        Ok(bdf)
    }

    fn assign_bars(
        &self,
        dev: &mut dyn PciDevice,
        bdf: PciAddress,
        bars: &[ProbedBar],
    ) -> Result<(), PciRootError> {
        let mut windows = self
            .shared
            .windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for bar in bars {
            let window = if bar.is_64bit {
                &mut windows.1
            } else {
                &mut windows.0
            };
            let base = window.allocate(bar.size).ok_or(PciRootError::WindowFull {
                bdf,
                bar: bar.index,
                size: bar.size,
                window: window.name,
            })?;
            let reg = offset::BAR0 + 4 * u16::from(bar.index);
            dev.config_write(reg, &(base as u32).to_le_bytes());
            if bar.is_64bit {
                dev.config_write(reg + 4, &((base >> 32) as u32).to_le_bytes());
            }
            debug!(
                "pci: {bdf} BAR{} at {base:#x} ({:#x} bytes)",
                bar.index, bar.size
            );
        }
        Ok(())
    }

    /// Where [`PciRoot::add_device`] would put the next function.
    pub fn first_free_device(&self) -> Option<PciAddress> {
        first_free(&self.functions_read())
    }

    /// The function at `bdf`, if any.
    pub fn device(&self, bdf: PciAddress) -> Option<SharedPciDevice> {
        if bdf.bus != 0 {
            return None;
        }
        self.function(bdf.devfn())
    }

    /// The ECAM (MMCONFIG) bus device.
    pub fn ecam(&self) -> PciEcam {
        PciEcam::new(self.clone())
    }

    /// The 0xCF8/0xCFC configuration-port bus device.
    pub fn config_io(&self) -> PciConfigIo {
        PciConfigIo::new(self.clone())
    }

    /// The bus device that dispatches accesses in the MMIO windows to BARs.
    pub fn mmio_windows(&self) -> PciMmioWindows {
        PciMmioWindows::new(self.clone())
    }

    fn functions_read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<SharedPciDevice>>> {
        self.shared
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn function(&self, devfn: u8) -> Option<SharedPciDevice> {
        self.functions_read()[usize::from(devfn)].clone()
    }

    /// A configuration read of bus 0; absent functions read all ones.
    fn config_read(&self, devfn: u8, offset: u16, data: &mut [u8]) {
        match self.function(devfn) {
            Some(device) => lock(&device).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write to bus 0; writes to absent functions are
    /// dropped. The function's BAR map is refreshed afterwards.
    fn config_write(&self, devfn: u8, offset: u16, data: &[u8]) {
        let Some(device) = self.function(devfn) else {
            return;
        };
        let mapped = {
            let mut dev = lock(&device);
            dev.config_write(offset, data);
            dev.mapped_bars()
        };
        self.update_routes(devfn, &device, mapped);
    }

    fn update_routes(&self, devfn: u8, device: &SharedPciDevice, mapped: Vec<MappedBar>) {
        let mut routes = self
            .shared
            .routes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        routes.retain(|r| r.devfn != devfn);
        routes.extend(mapped.into_iter().map(|bar| BarRoute {
            devfn,
            bar,
            device: device.clone(),
        }));
    }

    /// The BAR that decodes `[addr, addr + len)`, and the offset into it.
    fn route(&self, addr: u64, len: usize) -> Option<(BarRoute, u64)> {
        let routes = self
            .shared
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        routes
            .iter()
            .find_map(|r| r.offset_of(addr, len).map(|offset| (r.clone(), offset)))
    }
}

/// Function 0 of the first device number of bus 0 that has no function.
fn first_free(functions: &[Option<SharedPciDevice>]) -> Option<PciAddress> {
    (1..DEVICES_PER_BUS)
        .map(|device| PciAddress {
            bus: 0,
            device,
            function: 0,
        })
        .find(|bdf| functions[usize::from(bdf.devfn())].is_none())
}

fn read_config_u32(dev: &mut dyn PciDevice, offset: u16) -> u32 {
    let mut b = [0; 4];
    dev.config_read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn read_config_u16(dev: &mut dyn PciDevice, offset: u16) -> u16 {
    let mut b = [0; 2];
    dev.config_read(offset, &mut b);
    u16::from_le_bytes(b)
}

/// Sizes the memory BARs of `dev` the way firmware does: write all ones,
/// read back the mask, restore.
fn probe_bars(dev: &mut dyn PciDevice, bdf: PciAddress) -> Vec<ProbedBar> {
    let mut bars = Vec::new();
    let mut index = 0;
    while index < BAR_COUNT as u16 {
        let reg = offset::BAR0 + 4 * index;
        let original = read_config_u32(dev, reg);
        dev.config_write(reg, &u32::MAX.to_le_bytes());
        let mask = read_config_u32(dev, reg);
        dev.config_write(reg, &original.to_le_bytes());
        if mask == 0 {
            index += 1;
            continue;
        }
        if mask & bar::IO_SPACE != 0 {
            warn!("pci: {bdf} BAR{index} is an I/O BAR; the machine has no I/O window, left unassigned");
            index += 1;
            continue;
        }
        let is_64bit =
            mask & bar::MEM_TYPE_MASK == bar::MEM_TYPE_64 && index + 1 < BAR_COUNT as u16;
        let mut size_mask = u64::from(mask & bar::MEM_ADDRESS_MASK) | 0xffff_ffff_0000_0000;
        if is_64bit {
            let high = reg + 4;
            let original_high = read_config_u32(dev, high);
            dev.config_write(high, &u32::MAX.to_le_bytes());
            let mask_high = read_config_u32(dev, high);
            dev.config_write(high, &original_high.to_le_bytes());
            size_mask = (size_mask & 0xffff_ffff) | (u64::from(mask_high) << 32);
        }
        let size = (!size_mask).wrapping_add(1);
        if size.is_power_of_two() {
            bars.push(ProbedBar {
                index: index as u8,
                size,
                is_64bit,
            });
        } else {
            warn!("pci: {bdf} BAR{index} has an invalid size mask {size_mask:#x}, left unassigned");
        }
        index += if is_64bit { 2 } else { 1 };
    }
    bars
}
