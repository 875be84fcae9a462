//! A guest-side driver for tests: programs the function the way firmware
//! and Linux's idxd driver do and inspects what a guest would see.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::{StoreKind, StoreReply};
use pasid::{IdentityPasids, PasidTranslator};
use pci::{cap_id, MsiMessage, MsiRecorder, PciDevice};
use vdsa::descriptor::Descriptor;
use vdsa::dma::{DmaPort, MockIommu};
use vdsa::portal::Portal;
use vdsa::regs::{layout, offset};
use vdsa::{Dsa, DsaConfig, DsaIommuHandle};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 16 << 20;
pub const MSI_ADDRESS: u64 = 0xfee0_0000;
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// MSI-X data of vector `v` as the tests program it.
pub fn msi_data(v: u16) -> u32 {
    0x40 + u32::from(v)
}

pub fn msi(v: u16) -> MsiMessage {
    MsiMessage {
        address: MSI_ADDRESS,
        data: msi_data(v),
    }
}

pub fn memory() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

/// How a WQ is set up.
#[derive(Clone, Copy, Debug)]
pub struct WqSpec {
    pub wq: usize,
    pub group: usize,
    pub dedicated: bool,
    pub size: u16,
    pub threshold: u16,
    pub pasid_en: bool,
    pub pasid: u32,
    pub privileged: bool,
    pub bof: bool,
}

impl WqSpec {
    /// A kernel-style dedicated WQ without PASID.
    pub fn dedicated(wq: usize, group: usize) -> Self {
        Self {
            wq,
            group,
            dedicated: true,
            size: 16,
            threshold: 0,
            pasid_en: false,
            pasid: 0,
            privileged: false,
            bof: false,
        }
    }

    /// A shared WQ (PASID enabled, as shared WQs need).
    pub fn shared(wq: usize, group: usize) -> Self {
        Self {
            dedicated: false,
            threshold: 8,
            pasid_en: true,
            ..Self::dedicated(wq, group)
        }
    }

    pub fn dword2(&self) -> u32 {
        u32::from(self.dedicated)
            | (u32::from(self.bof) << 1)
            | (1 << 4)
            | ((self.pasid & 0xf_ffff) << 8)
            | (u32::from(self.pasid_en) << 28)
            | (u32::from(self.privileged) << 29)
    }
}

pub struct Guest {
    pub dsa: Dsa,
    pub mem: Arc<GuestMemoryMmap>,
    pub msi: Arc<MsiRecorder>,
    pub iommu: DsaIommuHandle,
    pub config: DsaConfig,
}

impl Guest {
    pub fn new(config: DsaConfig, port: Arc<dyn DmaPort>, mem: Arc<GuestMemoryMmap>) -> Self {
        Self::with_translator(config, port, mem, Arc::new(IdentityPasids))
    }

    /// A device whose guest-programmed PASIDs go through `pasids`.
    pub fn with_translator(
        config: DsaConfig,
        port: Arc<dyn DmaPort>,
        mem: Arc<GuestMemoryMmap>,
        pasids: Arc<dyn PasidTranslator>,
    ) -> Self {
        let msi = Arc::new(MsiRecorder::new());
        let mut dsa = Dsa::with_pasid_translator(config, port, msi.clone(), pasids).unwrap();
        // Firmware: assign BARs.
        dsa.config_space_mut()
            .set_bar_address(0, 0xfe00_0000)
            .unwrap();
        dsa.config_space_mut()
            .set_bar_address(2, 0xfd00_0000)
            .unwrap();
        let iommu = dsa.iommu_handle();
        Self {
            dsa,
            mem,
            msi,
            iommu,
            config,
        }
    }

    /// A device over a mock IOMMU (with or without ATS).
    pub fn with_mock(config: DsaConfig, ats: bool) -> (Self, Arc<MockIommu>) {
        let mem = memory();
        let mock = Arc::new(if ats {
            MockIommu::with_ats(mem.clone())
        } else {
            MockIommu::new(mem.clone())
        });
        (Self::new(config, mock.clone(), mem), mock)
    }

    /// A device over a mock IOMMU with PASID, PRI and ATS enabled and
    /// `wqs` configured and enabled.
    pub fn with_wqs(ats: bool, wqs: &[WqSpec]) -> (Self, Arc<MockIommu>) {
        let (mut g, mock) = Self::with_mock(DsaConfig::default(), ats);
        g.enable_pci();
        g.enable_pasid_pri_ats();
        g.setup(wqs);
        (g, mock)
    }

    pub fn cfg_read16(&mut self, at: u16) -> u16 {
        let mut b = [0u8; 2];
        self.dsa.config_read(at, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn cfg_read32(&mut self, at: u16) -> u32 {
        let mut b = [0u8; 4];
        self.dsa.config_read(at, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn cfg_write16(&mut self, at: u16, v: u16) {
        self.dsa.config_write(at, &v.to_le_bytes());
    }

    pub fn cfg_write32(&mut self, at: u16, v: u32) {
        self.dsa.config_write(at, &v.to_le_bytes());
    }

    /// pci_enable_device + pci_set_master.
    pub fn enable_pci(&mut self) {
        self.cfg_write16(0x04, 0x0006);
    }

    /// Enables MSI-X with every vector programmed and unmasked.
    pub fn enable_msix(&mut self) {
        let cap = self.find_cap(cap_id::MSIX);
        for v in 0..self.config.vectors() {
            let base = layout::MSIX_TABLE + u64::from(v) * 16;
            self.write32(base, MSI_ADDRESS as u32);
            self.write32(base + 4, 0);
            self.write32(base + 8, msi_data(v));
            self.write32(base + 12, 0);
        }
        let control = self.cfg_read16(cap + 2);
        self.cfg_write16(cap + 2, control | 0x8000);
    }

    pub fn find_cap(&mut self, id: u8) -> u16 {
        let mut at = u16::from(self.cfg_read16(0x34) as u8);
        while at != 0 {
            let header = self.cfg_read16(at);
            if header as u8 == id {
                return at;
            }
            at = header >> 8;
        }
        panic!("capability {id:#x} not found");
    }

    /// What the IOMMU driver enables for SVA: PASID (with privileged
    /// mode), PRI (allocation 32), ATS.
    pub fn enable_pasid_pri_ats(&mut self) {
        let ext = self.dsa.extended_capabilities();
        self.cfg_write16(ext.pasid + 6, 0b101);
        self.cfg_write32(ext.pri + 0xc, 32);
        self.cfg_write16(ext.pri + 4, 1);
        self.cfg_write16(ext.ats + 6, 0x8000);
    }

    pub fn read32(&mut self, at: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dsa.bar_read(0, at, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn read64(&mut self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        self.dsa.bar_read(0, at, &mut b);
        u64::from_le_bytes(b)
    }

    pub fn write32(&mut self, at: u64, v: u32) {
        self.dsa.bar_write(0, at, &v.to_le_bytes());
    }

    pub fn write64(&mut self, at: u64, v: u64) {
        self.dsa.bar_write(0, at, &v.to_le_bytes());
    }

    /// Writes CMD and polls CMDSTS until Active clears; returns CMDSTS.
    pub fn command_polled(&mut self, cmd: u32, operand: u32, int_req: bool) -> u32 {
        self.write32(
            offset::CMD,
            (cmd << 20) | operand | (u32::from(int_req) << 31),
        );
        let start = Instant::now();
        loop {
            let sts = self.read32(offset::CMDSTS);
            if sts & (1 << 31) == 0 {
                return sts;
            }
            assert!(start.elapsed() < TIMEOUT, "command {cmd} never completed");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// What idxd_cmd_exec does: int_req, wait for vector 0, check and clear
    /// INTCAUSE.CMD, read CMDSTS.
    pub fn command(&mut self, cmd: u32, operand: u32) -> u32 {
        self.msi.take();
        self.write32(offset::CMD, (cmd << 20) | operand | (1 << 31));
        let start = Instant::now();
        while self.msi.is_empty() {
            assert!(
                start.elapsed() < TIMEOUT,
                "no completion interrupt for command {cmd}"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        assert_eq!(
            self.msi.take(),
            vec![msi(0)],
            "command completion is vector 0"
        );
        let cause = self.read32(offset::INTCAUSE);
        assert_eq!(cause & 0x2, 0x2, "INTCAUSE.CMD set");
        self.write32(offset::INTCAUSE, cause);
        self.read32(offset::CMDSTS)
    }

    pub fn wqcfg(&self, wq: usize, dw: usize) -> u64 {
        layout::WQCFG + wq as u64 * 64 + dw as u64 * 4
    }

    pub fn grpcfg(&self, group: usize) -> u64 {
        layout::GRPCFG + group as u64 * 64
    }

    /// Writes a group's WQ and engine bitmaps.
    pub fn set_group(&mut self, group: usize, wqs: u64, engines: u64) {
        let at = self.grpcfg(group);
        self.write64(at, wqs);
        self.write64(at + 32, engines);
    }

    /// Writes the WQ configuration the way idxd_wq_config_write does
    /// (OR in the register contents, then write every dword).
    pub fn write_wq(&mut self, spec: &WqSpec) {
        let mut shadow = [0u32; 16];
        for (dw, v) in shadow.iter_mut().enumerate() {
            *v |= self.read32(self.wqcfg(spec.wq, dw));
        }
        shadow[0] = (shadow[0] & !0xffff) | u32::from(spec.size);
        shadow[1] = (shadow[1] & !0xffff) | u32::from(spec.threshold);
        shadow[2] |= spec.dword2();
        shadow[3] = 31 | (10 << 5);
        for (dw, v) in shadow.iter().enumerate() {
            let at = self.wqcfg(spec.wq, dw);
            self.write32(at, *v);
        }
    }

    /// Configures groups (engine `g` in group `g`), WQs and enables the
    /// device and the WQs.
    pub fn setup(&mut self, wqs: &[WqSpec]) {
        self.setup_engines(wqs, |g| 1 << g);
    }

    /// Like [`Guest::setup`], with `engines(g)` the engine bitmap of group
    /// `g` (when it has WQs).
    pub fn setup_engines(&mut self, wqs: &[WqSpec], engines: impl Fn(usize) -> u64) {
        self.enable_pci();
        self.enable_msix();
        assert_eq!(self.command_polled(5, 0, false), 0);
        self.write32(offset::GENCTRL, 0b11);
        for spec in wqs {
            self.write_wq(spec);
        }
        for g in 0..usize::from(self.config.num_groups) {
            let members: u64 = wqs.iter().filter(|s| s.group == g).map(|s| 1 << s.wq).sum();
            let at = self.grpcfg(g);
            self.write64(at, members);
            self.write64(at + 32, if members != 0 { engines(g) } else { 0 });
            self.write64(at + 40, (1 << 3) | 1);
        }
        assert_eq!(self.command(1, 0), 0, "enable device");
        for spec in wqs {
            if self.config.interrupt_handles {
                let v = spec.wq as u32 + 1;
                assert_eq!(self.command(13, v), v << 8, "request interrupt handle");
            }
            assert_eq!(self.command(6, spec.wq as u32), 0, "enable WQ {}", spec.wq);
        }
    }

    pub fn submit(
        &mut self,
        wq: usize,
        limited: bool,
        desc: &Descriptor,
        kind: StoreKind,
    ) -> StoreReply {
        self.dsa
            .bar_store64(2, Portal::offset(wq, limited), &desc.0, kind)
    }

    /// Submits with MOVDIR64B to a dedicated WQ.
    pub fn movdir64b(&mut self, wq: usize, desc: &Descriptor) {
        assert_eq!(
            self.submit(wq, true, desc, StoreKind::Movdir64b),
            StoreReply::Accepted
        );
    }

    /// Waits for the completion record at `addr` to have a non-zero status.
    pub fn wait_cr(&self, addr: u64) -> [u8; 32] {
        let start = Instant::now();
        loop {
            let status: u8 = self.mem.read_obj(GuestAddress(addr)).unwrap();
            if status != 0 {
                let mut cr = [0u8; 32];
                self.mem.read_slice(&mut cr, GuestAddress(addr)).unwrap();
                return cr;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "no completion record at {addr:#x}"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Waits until `n` MSIs arrived and returns them.
    pub fn wait_msis(&self, n: usize) -> Vec<MsiMessage> {
        let start = Instant::now();
        while self.msi.len() < n {
            assert!(
                start.elapsed() < TIMEOUT,
                "expected {n} MSIs, got {}",
                self.msi.len()
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        self.msi.take()
    }

    /// Waits until SWERROR holds an error; returns its four qwords.
    pub fn wait_swerr(&mut self) -> [u64; 4] {
        let start = Instant::now();
        loop {
            let q0 = self.read64(offset::SWERR);
            if q0 & 1 == 1 {
                return [q0, self.read64(0xc8), self.read64(0xd0), self.read64(0xd8)];
            }
            assert!(start.elapsed() < TIMEOUT, "no software error");
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    pub fn fill(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Waits until WQ `wq` is idle (occupancy 0 and a NOOP after it done).
    pub fn settle(&self) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pseudo-random byte pattern.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

pub fn u32_at(cr: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(cr[at..at + 4].try_into().unwrap())
}

pub fn u64_at(cr: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(cr[at..at + 8].try_into().unwrap())
}
