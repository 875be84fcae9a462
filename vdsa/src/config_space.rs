//! The DSA function's PCI configuration space: identity, BARs, the PCI
//! Express capability of a root-complex integrated endpoint, MSI-X, and the
//! ATS, PASID and PRI extended capabilities with the values Linux checks
//! (DSA specification Appendix C; Linux `drivers/pci/ats.c`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use pci::{
    ext_cap_id, BarKind, ConfigError, MsixConfig, PciConfiguration, PciHeader, PcieCapability,
    PcieDeviceType,
};

use crate::regs::layout;

/// Intel's vendor ID.
pub const VENDOR_ID: u16 = 0x8086;
/// DSA on Sapphire Rapids (`PCI_DEVICE_ID_INTEL_DSA_SPR0`).
pub const DEVICE_ID: u16 = 0x0b25;
/// Class: base 0x08 (system peripheral), subclass 0x80 (other).
pub const CLASS_CODE: u32 = 0x08_8000;

/// PASID capability register: max width 20 (bits 12:8) and privileged
/// mode (bit 2); no execute permission (`lspci`: `Exec- Priv+`, see
/// [`crate::profile`]).
pub const PASID_CAP: u16 = ((pasid::PASID_BITS as u16) << 8) | (1 << 2);
/// PASID control: PASID enable.
pub const PASID_CTRL_ENABLE: u16 = 1 << 0;
/// PASID control: execute permission enable.
pub const PASID_CTRL_EXEC: u16 = 1 << 1;
/// PASID control: privileged mode enable.
pub const PASID_CTRL_PRIV: u16 = 1 << 2;
/// ATS capability: global invalidate (6) and page-aligned requests (5);
/// invalidate queue depth 0 (= 32).
pub const ATS_CAP: u16 = (1 << 6) | (1 << 5);
/// ATS control: enable.
pub const ATS_CTRL_ENABLE: u16 = 1 << 15;
/// PRI control: enable.
pub const PRI_CTRL_ENABLE: u16 = 1 << 0;
/// PRI control: reset.
pub const PRI_CTRL_RESET: u16 = 1 << 1;
/// PRI status: response failure (write-1-to-clear).
pub const PRI_STATUS_RF: u16 = 1 << 0;
/// PRI status: unexpected page request group index (write-1-to-clear).
pub const PRI_STATUS_UPRGI: u16 = 1 << 1;
/// PRI status: stopped.
pub const PRI_STATUS_STOPPED: u16 = 1 << 8;
/// PRI status: PRG response PASID required.
pub const PRI_STATUS_PASID_REQUIRED: u16 = 1 << 15;
/// Outstanding page request capacity.
pub const PRI_CAPACITY: u32 = 0x200;

/// Offsets of the extended capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtCaps {
    /// ATS capability.
    pub ats: u16,
    /// PASID capability.
    pub pasid: u16,
    /// PRI capability.
    pub pri: u16,
}

impl ExtCaps {
    /// PASID control register.
    pub fn pasid_ctrl(&self) -> u16 {
        self.pasid + 6
    }
    /// ATS control register.
    pub fn ats_ctrl(&self) -> u16 {
        self.ats + 6
    }
    /// PRI control register.
    pub fn pri_ctrl(&self) -> u16 {
        self.pri + 4
    }
    /// PRI status register.
    pub fn pri_status(&self) -> u16 {
        self.pri + 6
    }
    /// PRI outstanding page request allocation register.
    pub fn pri_alloc(&self) -> u16 {
        self.pri + 0xc
    }
}

/// Builds the configuration space and adds the MSI-X capability.
pub fn build(
    num_wqs: u8,
    msix: &mut MsixConfig,
) -> Result<(PciConfiguration, ExtCaps), ConfigError> {
    let mut config = PciConfiguration::new(&PciHeader {
        vendor_id: VENDOR_ID,
        device_id: DEVICE_ID,
        revision_id: 0,
        class_code: CLASS_CODE,
        subsystem_vendor_id: VENDOR_ID,
        subsystem_id: 0,
    });
    let prefetchable = true;
    config.add_bar(0, layout::BAR0_SIZE, BarKind::Memory64 { prefetchable })?;
    let bar2 = (u64::from(num_wqs) * layout::PORTALS_PER_WQ).next_power_of_two();
    config.add_bar(2, bar2, BarKind::Memory64 { prefetchable })?;
    PcieCapability {
        device_type: PcieDeviceType::RootComplexIntegratedEndpoint,
        end_end_tlp_prefix: true,
        flr: false,
    }
    .add_to(&mut config)?;
    msix.add_capability(
        &mut config,
        0,
        layout::MSIX_TABLE as u32,
        0,
        layout::MSIX_PBA as u32,
    )?;

    let mut body = [0u8; 4];
    body[..2].copy_from_slice(&ATS_CAP.to_le_bytes());
    let ats_writable = (ATS_CTRL_ENABLE | 0x1f).to_le_bytes();
    let ats = config.add_extended_capability(
        ext_cap_id::ATS,
        1,
        &body,
        &[0, 0, ats_writable[0], ats_writable[1]],
    )?;

    body[..2].copy_from_slice(&PASID_CAP.to_le_bytes());
    let pasid_writable = (PASID_CTRL_ENABLE | PASID_CTRL_PRIV).to_le_bytes();
    let pasid = config.add_extended_capability(
        ext_cap_id::PASID,
        1,
        &body,
        &[0, 0, pasid_writable[0], pasid_writable[1]],
    )?;

    let mut pri_body = [0u8; 12];
    pri_body[2..4].copy_from_slice(&(PRI_STATUS_PASID_REQUIRED | PRI_STATUS_STOPPED).to_le_bytes());
    pri_body[4..8].copy_from_slice(&PRI_CAPACITY.to_le_bytes());
    let mut pri_writable = [0u8; 12];
    pri_writable[..2].copy_from_slice(&(PRI_CTRL_ENABLE | PRI_CTRL_RESET).to_le_bytes());
    pri_writable[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    let pri = config.add_extended_capability(ext_cap_id::PRI, 1, &pri_body, &pri_writable)?;
    Ok((config, ExtCaps { ats, pasid, pri }))
}

/// The configuration-space controls the device model acts on, readable
/// from the engine threads.
#[derive(Debug, Default)]
pub struct PcieState {
    /// Bus master enable.
    pub bus_master: AtomicBool,
    /// PASID enable.
    pub pasid: AtomicBool,
    /// PASID privileged mode enable.
    pub pasid_priv: AtomicBool,
    /// ATS enable.
    pub ats: AtomicBool,
    /// PRI enable.
    pub pri: AtomicBool,
    /// PRI outstanding page request allocation.
    pub pri_alloc: AtomicU32,
}

impl PcieState {
    /// Picks up the controls from `config`.
    pub fn refresh(&self, config: &PciConfiguration, caps: &ExtCaps) {
        let pasid = config.read_u16(caps.pasid_ctrl());
        let set = |flag: &AtomicBool, value: bool| flag.store(value, Ordering::SeqCst);
        set(&self.bus_master, config.bus_master_enabled());
        set(&self.pasid, pasid & PASID_CTRL_ENABLE != 0);
        set(&self.pasid_priv, pasid & PASID_CTRL_PRIV != 0);
        set(
            &self.ats,
            config.read_u16(caps.ats_ctrl()) & ATS_CTRL_ENABLE != 0,
        );
        set(
            &self.pri,
            config.read_u16(caps.pri_ctrl()) & PRI_CTRL_ENABLE != 0,
        );
        self.pri_alloc
            .store(config.read_u32(caps.pri_alloc()), Ordering::SeqCst);
    }

    /// Reads one flag.
    pub fn get(flag: &AtomicBool) -> bool {
        flag.load(Ordering::SeqCst)
    }

    /// Whether the device may issue page requests: PRI and ATS enabled
    /// (page requests are never made with ATS disabled).
    pub fn page_requests(&self) -> bool {
        Self::get(&self.pri) && Self::get(&self.ats)
    }
}
