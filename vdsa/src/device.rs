//! The DSA PCI function: state shared with the engine and command threads,
//! BAR0 register access, and the [`PciDevice`] implementation.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::thread::JoinHandle;

use bus::{StoreKind, StoreReply};

use pci::{MappedBar, MsiSink, MsixConfig, PciConfiguration, PciDevice};

use crate::atc::Atc;
use crate::bits::le_value;
use crate::config_space::{self, ExtCaps, PcieState};
use crate::dma::{DmaPort, PageResponseCode};
use crate::engine::Group;
use crate::grpcfg::GrpCfg;
use crate::profile;
use crate::prs::PageRequester;
use crate::regs::{
    intcause, layout, offset, Capabilities, CmdReg, CmdSts, DeviceState, GenCfg, GenCtrl, GenSts,
    MsixPerm, DEVICE_VERSION_1,
};
use crate::swerr::{self, SoftwareError, SwErrReg};
use crate::wqcfg::{WqCfg, WqState};
use pasid::{IdentityPasids, PasidTranslator};

/// The shape of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsaConfig {
    /// Work queues (1 to 16).
    pub num_wqs: u8,
    /// Engines (1 to 8); each engine in a group is a worker thread.
    pub num_engines: u8,
    /// Groups (1 to 8).
    pub num_groups: u8,
    /// Total WQ entries.
    pub total_wq_size: u16,
    /// GENCAP maximum transfer size shift (12 to 31).
    pub max_xfer_shift: u8,
    /// GENCAP maximum batch size shift (1 to 15).
    pub max_batch_shift: u8,
    /// Advertise the Request/Release Interrupt Handle commands (GENCAP
    /// cmd_cap and CMDCAP); descriptors must then use handles the guest
    /// requested. A departure from the Sapphire Rapids profile, whose
    /// GENCAP has no CMDCAP.
    pub interrupt_handles: bool,
}

impl Default for DsaConfig {
    /// A Sapphire Rapids DSA 1.0 ([`crate::profile`]): 8 WQs sharing 128
    /// entries, 4 engines, 4 groups, 2 GiB transfers, batches of 1024, no
    /// interrupt handles (GENCAP.cmd_cap clear).
    fn default() -> Self {
        Self {
            num_wqs: profile::NUM_WQS,
            num_engines: profile::NUM_ENGINES,
            num_groups: profile::NUM_GROUPS,
            total_wq_size: profile::TOTAL_WQ_SIZE,
            max_xfer_shift: profile::MAX_XFER_SHIFT,
            max_batch_shift: profile::MAX_BATCH_SHIFT,
            interrupt_handles: false,
        }
    }
}

/// Errors creating a device.
#[derive(Debug, thiserror::Error)]
pub enum DsaError {
    /// A [`DsaConfig`] field is out of range.
    #[error("invalid DSA configuration: {0}")]
    InvalidConfig(&'static str),
    /// The configuration space could not be built.
    #[error("building the configuration space: {0}")]
    ConfigSpace(#[from] pci::ConfigError),
    /// The command thread could not start.
    #[error("starting the command thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl DsaConfig {
    fn validate(&self) -> Result<(), DsaError> {
        let check = |ok: bool, what| {
            if ok {
                Ok(())
            } else {
                Err(DsaError::InvalidConfig(what))
            }
        };
        check((1..=16).contains(&self.num_wqs), "num_wqs must be 1 to 16")?;
        check(
            (1..=8).contains(&self.num_engines),
            "num_engines must be 1 to 8",
        )?;
        check(
            (1..=8).contains(&self.num_groups),
            "num_groups must be 1 to 8",
        )?;
        check(self.total_wq_size > 0, "total_wq_size must not be 0")?;
        check(
            (12..=31).contains(&self.max_xfer_shift),
            "max_xfer_shift must be 12 to 31",
        )?;
        check(
            (1..=15).contains(&self.max_batch_shift),
            "max_batch_shift must be 1 to 15",
        )
    }

    /// MSI-X vectors: one per WQ plus the misc vector 0.
    pub fn vectors(&self) -> u16 {
        u16::from(self.num_wqs) + 1
    }
}

/// The writable and status registers of BAR0.
pub(crate) struct RegFile {
    pub gencfg: GenCfg,
    pub genctrl: GenCtrl,
    pub gensts: GenSts,
    pub intcause: u32,
    pub cmdsts: CmdSts,
    pub swerr: SwErrReg,
    pub wqcfg: Vec<WqCfg>,
    pub wq_state: Vec<WqState>,
    pub grpcfg: Vec<GrpCfg>,
}

impl RegFile {
    fn new(config: &DsaConfig, caps: &Capabilities) -> Self {
        Self {
            gencfg: GenCfg(0),
            genctrl: GenCtrl(0),
            gensts: GenSts(0),
            intcause: 0,
            cmdsts: CmdSts(0),
            swerr: SwErrReg::default(),
            wqcfg: vec![WqCfg::reset_value(&caps.opcap); usize::from(config.num_wqs)],
            wq_state: vec![WqState::Disabled; usize::from(config.num_wqs)],
            grpcfg: vec![
                GrpCfg::reset_value(caps.grpcap.total_rdbufs());
                usize::from(config.num_groups)
            ],
        }
    }

    /// Reset Device: everything back to power-on values except CMDSTS and
    /// SWERROR.
    pub fn reset(&mut self, config: &DsaConfig, caps: &Capabilities) {
        let (cmdsts, swerr) = (self.cmdsts, self.swerr);
        *self = Self::new(config, caps);
        self.cmdsts = cmdsts;
        self.swerr = swerr;
    }

    pub fn state(&self) -> DeviceState {
        match self.gensts.state() {
            0 => DeviceState::Disabled,
            1 => DeviceState::Enabled,
            2 => DeviceState::Draining,
            _ => DeviceState::Halted,
        }
    }

    pub fn set_state(&mut self, state: DeviceState) {
        self.gensts.set_state(state as u32);
    }
}

/// Where a WQ's submissions go while the device is enabled.
pub(crate) struct Route {
    pub group: Arc<Group>,
    pub slot: usize,
}

/// Engine threads of the enabled device.
#[derive(Default)]
pub(crate) struct Runtime {
    pub groups: Vec<Arc<Group>>,
    pub threads: Vec<JoinHandle<()>>,
}

/// State shared by the vCPU-facing device, the command thread and the
/// engine threads.
pub(crate) struct Inner {
    pub config: DsaConfig,
    pub caps: Capabilities,
    pub dma: Arc<dyn DmaPort>,
    pub msi: Arc<dyn MsiSink>,
    pub pasids: Arc<dyn PasidTranslator>,
    pub regs: Mutex<RegFile>,
    pub msix: Mutex<MsixConfig>,
    pub msix_perm: Vec<AtomicU32>,
    pub int_handles: Vec<AtomicBool>,
    pub user_int_en: AtomicBool,
    pub pcie: PcieState,
    pub routes: RwLock<Vec<Option<Route>>>,
    pub runtime: Mutex<Runtime>,
    pub atc: Atc,
    pub prs: PageRequester,
    pub commands: Mutex<Option<Sender<CmdReg>>>,
    me: Weak<Inner>,
}

impl Inner {
    /// A strong reference to this state (for threads it starts).
    pub fn self_arc(&self) -> Arc<Inner> {
        self.me
            .upgrade()
            .expect("Inner is alive while its methods run")
    }

    pub fn regs(&self) -> MutexGuard<'_, RegFile> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn msix(&self) -> MutexGuard<'_, MsixConfig> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn user_interrupts(&self) -> bool {
        self.user_int_en.load(Ordering::SeqCst)
    }

    /// Raises `cause` in INTCAUSE and fires vector 0.
    pub fn raise_misc(&self, regs: &mut RegFile, cause: u32) {
        regs.intcause |= cause;
        if PcieState::get(&self.pcie.bus_master) {
            self.msix().trigger(0, &*self.msi);
        }
    }

    /// Records a software error; interrupts if Valid went 0 -> 1 and
    /// software errors interrupt.
    /// The descriptor's PASID is reported in the guest's PASID space.
    pub fn record_software_error(&self, err: &SoftwareError) {
        let mut err = *err;
        if let Some(desc) = err.desc.as_mut() {
            // A host PASID that is not the guest's reads as 0.
            desc.pasid = self.pasids.to_guest(desc.pasid).unwrap_or(0);
        }
        let err = &err;
        log::debug!("DSA software error {err:?}");
        let mut regs = self.regs();
        if regs.swerr.record(err) && regs.genctrl.softerr_int_en() == 1 {
            self.raise_misc(&mut regs, intcause::ERR);
        }
    }

    /// Whether `handle` may be used by a descriptor from a WQ with PASID
    /// enable `pasid_en` and PASID `pasid` (Table 5-2 and MSIXPERM).
    pub fn interrupt_handle_ok(&self, handle: u16, pasid_en: bool, pasid: Option<u32>) -> bool {
        let index = usize::from(handle);
        let Some(perm) = self.msix_perm.get(index) else {
            return false;
        };
        if self.config.interrupt_handles && !self.int_handles[index].load(Ordering::SeqCst) {
            return false;
        }
        let perm = MsixPerm(perm.load(Ordering::SeqCst));
        if (perm.pasid_en() == 1) != pasid_en {
            return false;
        }
        // MSIXPERM holds a guest PASID; the descriptor's is a host PASID.
        !pasid_en || pasid.and_then(|h| self.pasids.to_guest(h)) == Some(perm.pasid())
    }

    /// Raises the completion interrupt of `handle` unless its MSI-X
    /// permission entry says Ignore.
    pub fn completion_interrupt(&self, handle: u16) {
        let index = usize::from(handle);
        let ignore = self
            .msix_perm
            .get(index)
            .is_none_or(|p| MsixPerm(p.load(Ordering::SeqCst)).ignore() == 1);
        if ignore || !PcieState::get(&self.pcie.bus_master) {
            return;
        }
        self.msix().trigger(handle, &*self.msi);
    }

    /// The state and occupancy of WQ `wq`.
    fn wq_status(&self, regs: &RegFile, wq: usize) -> u32 {
        let state = regs.wq_state[wq];
        let occupancy = self.routes.read().unwrap_or_else(|e| e.into_inner())[wq]
            .as_ref()
            .map_or(0, |r| r.group.lock().wqs[r.slot].queue.len());
        WqCfg::status_dword(state, occupancy.min(usize::from(u16::MAX)) as u16)
    }

    fn read_dword(&self, regs: &RegFile, at: u64) -> u32 {
        let caps = &self.caps;
        let lo_hi = |v: u64, at: u64, base: u64| (v >> (8 * (at - base))) as u32;
        let table = |base: u64, entry: u64, count: usize| {
            (at >= base && at < base + entry * count as u64)
                .then(|| ((at - base) / entry, (at - base) % entry))
        };
        if let Some((wq, off)) = table(layout::WQCFG, layout::WQCFG_SIZE, regs.wqcfg.len()) {
            let dw = (off / 4) as usize;
            if dw == crate::wqcfg::dword::STATUS {
                return self.wq_status(regs, wq as usize);
            }
            return regs.wqcfg[wq as usize].0[dw];
        }
        if let Some((g, off)) = table(layout::GRPCFG, layout::GRPCFG_SIZE, regs.grpcfg.len()) {
            let q = regs.grpcfg[g as usize].qword(off & !7);
            return lo_hi(q, off & 4, 0);
        }
        if let Some((v, off)) = table(
            layout::MSIX_PERM,
            layout::MSIX_PERM_SIZE,
            self.msix_perm.len(),
        ) {
            return if off == 0 {
                self.msix_perm[v as usize].load(Ordering::SeqCst)
            } else {
                0
            };
        }
        match at {
            offset::VERSION => DEVICE_VERSION_1,
            0x10 | 0x14 => lo_hi(caps.gencap.0, at, offset::GENCAP),
            0x20 | 0x24 => lo_hi(caps.wqcap.0, at, offset::WQCAP),
            0x30 | 0x34 => lo_hi(caps.grpcap.0, at, offset::GRPCAP),
            0x38 | 0x3c => lo_hi(caps.engcap.0, at, offset::ENGCAP),
            0x40..=0x5c => {
                let i = (at - offset::OPCAP) / 8;
                lo_hi(caps.opcap[i as usize], at, offset::OPCAP + i * 8)
            }
            0x60..=0x6c => {
                let i = (at - offset::OFFSETS) / 8;
                lo_hi(caps.offsets[i as usize], at, offset::OFFSETS + i * 8)
            }
            offset::GENCFG => regs.gencfg.0,
            offset::GENCTRL => regs.genctrl.0,
            offset::GENSTS => regs.gensts.0,
            offset::INTCAUSE => regs.intcause,
            offset::CMDSTS => regs.cmdsts.0,
            offset::CMDCAP if caps.gencap.cmd_cap() == 1 => caps.cmdcap,
            0xc0..=0xdc => {
                let i = (at - offset::SWERR) / 8;
                lo_hi(regs.swerr.0[i as usize], at, offset::SWERR + i * 8)
            }
            _ => 0,
        }
    }

    fn write_dword(&self, regs: &mut RegFile, at: u64, value: u32, mask: u32) {
        let merge =
            |old: u32, writable: u32| (old & !(mask & writable)) | (value & mask & writable);
        let disabled = regs.state() == DeviceState::Disabled;
        let table = |base: u64, entry: u64, count: usize| {
            (at >= base && at < base + entry * count as u64)
                .then(|| ((at - base) / entry, (at - base) % entry))
        };
        if let Some((wq, off)) = table(layout::WQCFG, layout::WQCFG_SIZE, regs.wqcfg.len()) {
            let wq = wq as usize;
            let wq_disabled = regs.wq_state[wq] == WqState::Disabled;
            if regs.wqcfg[wq].write((off / 4) as usize, value, mask, disabled, wq_disabled) {
                self.update_threshold(wq, regs.wqcfg[wq].threshold());
            }
            return;
        }
        if let Some((g, off)) = table(layout::GRPCFG, layout::GRPCFG_SIZE, regs.grpcfg.len()) {
            if disabled {
                let shift = 8 * (off & 4);
                regs.grpcfg[g as usize].write_qword(
                    off & !7,
                    u64::from(value) << shift,
                    u64::from(mask) << shift,
                );
            }
            return;
        }
        if let Some((v, off)) = table(
            layout::MSIX_PERM,
            layout::MSIX_PERM_SIZE,
            self.msix_perm.len(),
        ) {
            if off == 0 {
                let perm = &self.msix_perm[v as usize];
                perm.store(
                    merge(perm.load(Ordering::SeqCst), MsixPerm::WRITABLE),
                    Ordering::SeqCst,
                );
            }
            return;
        }
        match at {
            offset::GENCFG if disabled => regs.gencfg.0 = merge(regs.gencfg.0, GenCfg::WRITABLE),
            offset::GENCTRL => regs.genctrl.0 = merge(regs.genctrl.0, GenCtrl::WRITABLE),
            offset::INTCAUSE => regs.intcause &= !(value & mask & intcause::ALL),
            offset::CMD => self.submit_command(regs, CmdReg(value & mask)),
            offset::SWERR => regs.swerr.write_q0(u64::from(value), u64::from(mask)),
            _ => log::trace!("DSA: write {value:#x} to read-only BAR0 offset {at:#x} dropped"),
        }
    }

    fn update_threshold(&self, wq: usize, threshold: u16) {
        if let Some(route) = &self.routes.read().unwrap_or_else(|e| e.into_inner())[wq] {
            route.group.lock().wqs[route.slot].threshold = threshold;
        }
    }

    fn submit_command(&self, regs: &mut RegFile, cmd: CmdReg) {
        if regs.cmdsts.active() == 1 {
            let err = SoftwareError {
                code: swerr::code::CMD_WHILE_ACTIVE,
                ..SoftwareError::default()
            };
            if regs.swerr.record(&err) && regs.genctrl.softerr_int_en() == 1 {
                self.raise_misc(regs, intcause::ERR);
            }
            return;
        }
        let sender = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = sender.as_ref() {
            regs.cmdsts = CmdSts(0);
            regs.cmdsts.set_active(1);
            if sender.send(cmd).is_err() {
                regs.cmdsts = CmdSts(crate::command::status::HW_ERR);
            }
        }
    }

    /// A BAR0 read of 1, 2, 4 or 8 naturally aligned bytes.
    pub fn bar0_read(&self, at: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        if !matches!(len, 1 | 2 | 4 | 8) || at % len != 0 || at >= layout::BAR0_SIZE {
            data.fill(0xff);
            return;
        }
        if (layout::MSIX_TABLE..layout::MSIX_PBA).contains(&at) {
            return self.msix().table_read(at - layout::MSIX_TABLE, data);
        }
        if at >= layout::MSIX_PBA {
            return self.msix().pba_read(at - layout::MSIX_PBA, data);
        }
        let regs = self.regs();
        let value = if len == 8 {
            u64::from(self.read_dword(&regs, at))
                | (u64::from(self.read_dword(&regs, at + 4)) << 32)
        } else {
            u64::from(self.read_dword(&regs, at & !3) >> (8 * (at & 3)))
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    /// A BAR0 write of 1, 2, 4 or 8 naturally aligned bytes; anything else
    /// is dropped.
    pub fn bar0_write(&self, at: u64, data: &[u8]) {
        let len = data.len() as u64;
        if !matches!(len, 1 | 2 | 4 | 8) || at % len != 0 || at >= layout::BAR0_SIZE {
            return;
        }
        if (layout::MSIX_TABLE..layout::MSIX_PBA).contains(&at) {
            return self
                .msix()
                .table_write(at - layout::MSIX_TABLE, data, &*self.msi);
        }
        if at >= layout::MSIX_PBA {
            return;
        }
        let value = le_value(data);
        let mut regs = self.regs();
        if len == 8 {
            self.write_dword(&mut regs, at, value as u32, u32::MAX);
            self.write_dword(&mut regs, at + 4, (value >> 32) as u32, u32::MAX);
        } else {
            let shift = 8 * (at & 3);
            let mask = crate::bits::mask::<u64>(8 * len as u32) << shift;
            self.write_dword(&mut regs, at & !3, (value << shift) as u32, mask as u32);
        }
    }

    /// Enters the halt state after an unsupported configuration change.
    pub fn halt(&self) {
        self.stop_engines(true);
        let mut regs = self.regs();
        regs.set_state(DeviceState::Halted);
        regs.gensts.set_reset_type(0);
        for state in regs.wq_state.iter_mut() {
            *state = WqState::Disabled;
        }
        let err = SoftwareError {
            code: swerr::code::CONFIG_CHANGE,
            ..SoftwareError::default()
        };
        let new = regs.swerr.record(&err);
        if new && regs.genctrl.softerr_int_en() == 1 {
            self.raise_misc(&mut regs, intcause::ERR);
        }
        if regs.genctrl.halt_int_en() == 1 {
            self.raise_misc(&mut regs, intcause::HALT_STATE);
        }
    }
}

/// A handle the IOMMU model keeps to answer page requests and invalidate
/// the device TLB, without going through the PCI bus lock.
///
/// It does not keep the device alive: the IOMMU model and the PASID
/// bookkeeping that hold it are themselves reachable from the device (its
/// DMA port, its PASID translator), so a strong reference would make a
/// cycle that outlives the VM. Once the [`Dsa`] is dropped (its threads
/// joined) the handle's calls do nothing: there is no device left to
/// answer, to cache a translation or to use a PASID.
#[derive(Clone)]
pub struct DsaIommuHandle {
    inner: Weak<Inner>,
}

impl DsaIommuHandle {
    fn device(&self) -> Option<Arc<Inner>> {
        self.inner.upgrade()
    }

    /// Delivers a PRG response for the page request group `prg_index`.
    pub fn page_response(&self, prg_index: u16, code: PageResponseCode) {
        if let Some(inner) = self.device() {
            inner.prs.respond(prg_index, code);
        }
    }

    /// Invalidates cached translations of `pasid` (of every PASID and of
    /// untagged requests when `None`) overlapping `[addr, addr + len)`.
    /// Returns once no access uses an invalidated translation.
    pub fn invalidate_device_tlb(&self, pasid: Option<u32>, addr: u64, len: u64) {
        if let Some(inner) = self.device() {
            inner.atc.invalidate(pasid, addr, len);
        }
    }

    /// Whether the device still holds work or configuration tagged with
    /// `pasid`: a queued or running descriptor, or an enabled dedicated WQ
    /// whose PASID it is. The VMM frees a host PASID only once no device
    /// says so. A device that is gone uses nothing.
    pub fn pasid_in_use(&self, pasid: u32) -> bool {
        self.device().is_some_and(|inner| inner.pasid_in_use(pasid))
    }

    /// The number of translations in the device TLB (0 once the device is
    /// gone).
    pub fn cached_translations(&self) -> usize {
        self.device().map_or(0, |inner| inner.atc.len())
    }
}

/// A virtual Intel DSA 1.0 PCI function.
pub struct Dsa {
    inner: Arc<Inner>,
    config: PciConfiguration,
    ext: ExtCaps,
    command_thread: Option<JoinHandle<()>>,
}

impl Dsa {
    /// Creates the device. All its memory accesses go through `dma`; its
    /// MSI-X messages go to `msi`.
    pub fn new(
        config: DsaConfig,
        dma: Arc<dyn DmaPort>,
        msi: Arc<dyn MsiSink>,
    ) -> Result<Self, DsaError> {
        Self::with_pasid_translator(config, dma, msi, Arc::new(IdentityPasids))
    }

    /// Creates the device with `pasids` translating the PASIDs the guest
    /// programs into the host PASIDs the device works in (see
    /// [`pasid::translator`]).
    pub fn with_pasid_translator(
        config: DsaConfig,
        dma: Arc<dyn DmaPort>,
        msi: Arc<dyn MsiSink>,
        pasids: Arc<dyn PasidTranslator>,
    ) -> Result<Self, DsaError> {
        config.validate()?;
        let caps = Capabilities::new(&config);
        let mut msix = MsixConfig::new(config.vectors());
        let (pci_config, ext) = config_space::build(config.num_wqs, &mut msix)?;
        let vectors = usize::from(config.vectors());
        let (sender, receiver) = mpsc::channel();
        let inner = Arc::new_cyclic(|me| Inner {
            config,
            regs: Mutex::new(RegFile::new(&config, &caps)),
            caps,
            dma,
            msi,
            pasids,
            msix: Mutex::new(msix),
            msix_perm: (0..vectors).map(|_| AtomicU32::new(0)).collect(),
            int_handles: (0..vectors).map(|_| AtomicBool::new(false)).collect(),
            user_int_en: AtomicBool::new(false),
            pcie: PcieState::default(),
            routes: RwLock::new((0..config.num_wqs).map(|_| None).collect()),
            runtime: Mutex::new(Runtime::default()),
            atc: Atc::default(),
            prs: PageRequester::default(),
            commands: Mutex::new(Some(sender)),
            me: me.clone(),
        });
        inner.pcie.refresh(&pci_config, &ext);
        let worker = inner.clone();
        let command_thread = std::thread::Builder::new()
            .name("dsa-cmd".into())
            .spawn(move || crate::command::run(worker, receiver))
            .map_err(DsaError::Thread)?;
        Ok(Self {
            inner,
            config: pci_config,
            ext,
            command_thread: Some(command_thread),
        })
    }

    /// The handle through which the IOMMU answers page requests and
    /// invalidates the device TLB.
    pub fn iommu_handle(&self) -> DsaIommuHandle {
        DsaIommuHandle {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// The configuration space (for firmware-style BAR assignment).
    pub fn config_space_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    /// The capability registers this device reports.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    /// Offsets of the ATS, PASID and PRI capabilities.
    pub fn extended_capabilities(&self) -> ExtCaps {
        self.ext
    }

    fn refresh_pri_status(&mut self) {
        let (rf, uprgi, idle) = self.inner.prs.status();
        let enabled =
            self.config.read_u16(self.ext.pri_ctrl()) & config_space::PRI_CTRL_ENABLE != 0;
        let mut status = config_space::PRI_STATUS_PASID_REQUIRED;
        if rf {
            status |= config_space::PRI_STATUS_RF;
        }
        if uprgi {
            status |= config_space::PRI_STATUS_UPRGI;
        }
        if idle && !enabled {
            status |= config_space::PRI_STATUS_STOPPED;
        }
        self.config.set_u16(self.ext.pri_status(), status);
    }
}

impl Drop for Dsa {
    fn drop(&mut self) {
        self.inner
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // Abandon queued and blocked work first, so a command that waits
        // for it (a drain, a disable) finishes and its thread can exit.
        let groups = self
            .inner
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .groups
            .clone();
        for group in groups {
            group.abort(|_, _| true);
        }
        self.inner.prs.wake();
        if let Some(thread) = self.command_thread.take() {
            let _ = thread.join();
        }
        self.inner.stop_engines(true);
    }
}

fn covers(offset: u16, len: usize, register: u16, register_len: u16) -> bool {
    let (start, end) = (u32::from(offset), u32::from(offset) + len as u32);
    start < u32::from(register) + u32::from(register_len) && u32::from(register) < end
}

impl PciDevice for Dsa {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if covers(offset, data.len(), self.ext.pri_status(), 2) {
            self.refresh_pri_status();
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        let pri_status = self.ext.pri_status();
        if covers(offset, data.len(), pri_status, 2) {
            // RF and UPRGI are write-1-to-clear device state.
            let mut bytes = [0u8; 4];
            let mut written = 0u16;
            for (i, b) in data.iter().enumerate() {
                let at = offset + i as u16;
                if at == pri_status || at == pri_status + 1 {
                    bytes[usize::from(at - pri_status)] = *b;
                    written |= 0xff << (8 * (at - pri_status));
                }
            }
            let value = u16::from_le_bytes([bytes[0], bytes[1]]) & written;
            self.inner.prs.clear_status(
                value & config_space::PRI_STATUS_RF != 0,
                value & config_space::PRI_STATUS_UPRGI != 0,
            );
        }
        let was = (
            PcieState::get(&self.inner.pcie.bus_master),
            PcieState::get(&self.inner.pcie.ats),
        );
        self.config.write(offset, data);
        let pri_ctrl = self.config.read_u16(self.ext.pri_ctrl());
        if pri_ctrl & config_space::PRI_CTRL_RESET != 0 {
            self.config.set_u16(
                self.ext.pri_ctrl(),
                pri_ctrl & !config_space::PRI_CTRL_RESET,
            );
            if pri_ctrl & config_space::PRI_CTRL_ENABLE == 0 {
                self.inner.prs.reset();
            }
        }
        self.inner.pcie.refresh(&self.config, &self.ext);
        let now = (
            PcieState::get(&self.inner.pcie.bus_master),
            PcieState::get(&self.inner.pcie.ats),
        );
        if was.1 && !now.1 {
            self.inner.atc.clear();
        }
        if was.0 && !now.0 && self.inner.regs().state() == DeviceState::Enabled {
            log::warn!("DSA: bus mastering turned off while enabled; halting");
            self.inner.halt();
        }
        let msix = &mut *self.inner.msix.lock().unwrap_or_else(|e| e.into_inner());
        msix.update(&self.config, &*self.inner.msi);
    }

    fn mapped_bars(&self) -> Vec<MappedBar> {
        self.config.mapped_bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            0 => self.inner.bar0_read(offset, data),
            // Portals read as all ones.
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            0 => self.inner.bar0_write(offset, data),
            2 => {
                // A plain 64-byte write is how a guest without MOVDIR64B
                // emulation reaches a dedicated WQ.
                if let Ok(desc) = <&[u8; 64]>::try_from(data) {
                    self.inner.submit(offset, desc, StoreKind::Movdir64b);
                }
            }
            _ => {}
        }
    }

    fn bar_store64(
        &mut self,
        bar: u8,
        offset: u64,
        data: &[u8; 64],
        kind: StoreKind,
    ) -> StoreReply {
        match (bar, kind) {
            (2, _) => self.inner.submit(offset, data, kind),
            (_, StoreKind::Movdir64b) => {
                self.bar_write(bar, offset, data);
                StoreReply::Accepted
            }
            _ => StoreReply::Retry,
        }
    }
}
