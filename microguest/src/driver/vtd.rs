//! The guest side of the VT-d remapping unit in scalable mode: the
//! translation structures in guest memory (VT-d 9.4-9.6), the register
//! sequence that turns translation on (11.4), queued invalidation (6.5.2)
//! and the page request queue with page group responses (7.5-7.7).

use iced_x86::code_asm::*;
use viommu::invalidation::desc_type;
use viommu::regs::{gcmd, iqa, pqa, prs, rtaddr, GCMD, GSTS, IQT, PQA, PQH, PQT, PRS, RTADDR};
use viommu::tables::{context, pasid_entry, ContextEntry, PasidEntry, RootEntry};

use super::{
    fail_with_eax, poll, report, slot, store_qwords, zero_pages, Step, Until, Width,
    INVALIDATION_QUEUE_START, PAGE_REQUEST_QUEUE_START, QI_SCRATCH, QI_STATUS, VTD_TABLES_PAGES,
    VTD_TABLES_START,
};
use crate::{DATA_PT_START, DATA_START, PTE_P, PTE_U, PTE_W};
use pci::PciAddress;
use vmm::layout;

/// Present bit of a root-entry half and of a PASID-directory entry.
const PRESENT: u64 = 1;
/// PGTT value of first-stage translation.
const PGTT_FIRST_STAGE: u64 = 1;
/// AW value Linux writes (4-level, 48-bit) even for first-stage entries.
const AW_48_BIT: u64 = 2;
/// PASID-table entry qw1 bit 23: page-walk snoop (PWSNP).
const PWSNP: u64 = 1 << 23;
/// PDTS the guest uses: 2^(0+7) directory entries, PASIDs below 8192.
const PDTS: u64 = 0;
/// PASIDs the directory covers with [`PDTS`].
pub const MAX_PASIDS: u32 = 1 << (PDTS + 7 + 6);
/// PASID-directory entries per table covered (PASID bits 5:0 index the table).
const PASIDS_PER_TABLE: u32 = 64;

/// Status value an invalidation wait descriptor writes (as Linux's
/// qi_submit_sync waits for).
pub const QI_DONE: u32 = 2;
/// Invalidation queue size field: 4 KiB << QS.
const IQA_QS: u64 = 0;
/// Page request queue size field: 4 KiB << PQS.
const PQA_PQS: u64 = 0;
/// Bytes per (256-bit) invalidation descriptor.
const QI_DESCRIPTOR_SIZE: u64 = 32;
/// Bytes per page request descriptor.
const PRQ_DESCRIPTOR_SIZE: u64 = 32;

/// Context-entry controls, named as in VT-d 9.4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextControls {
    /// DTE: device-TLB (ATS) enable.
    pub dte: bool,
    /// PRE: page requests enable.
    pub pre: bool,
}

impl Default for ContextControls {
    /// What Linux sets for an SVA-capable device: DTE and PRE.
    fn default() -> Self {
        Self {
            dte: true,
            pre: true,
        }
    }
}

/// A user (first-stage, CPL3 page tables) PASID binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstStageBinding {
    /// The guest PASID.
    pub pasid: u32,
    /// FLPTR: the process's page-table root (its CR3).
    pub flptr: u64,
    /// Domain ID.
    pub did: u16,
}

/// The scalable-mode structures of one guest: the host plans the layout
/// and computes every entry; [`ScalableTables::emit`] makes the guest zero
/// the pages and store the entries.
#[derive(Clone, Debug)]
pub struct ScalableTables {
    base: u64,
    pages: u64,
    /// (rid, PASID-directory page).
    directories: Vec<(PciAddress, u64)>,
    /// (rid, directory index, PASID-table page).
    pasid_tables: Vec<(PciAddress, u32, u64)>,
    /// (bus, context-table page for devfn 0-127 or 128-255, upper half).
    context_tables: Vec<(u8, bool, u64)>,
    stores: Vec<(u64, Vec<u64>)>,
}

/// Errors planning the structures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TablesError {
    /// More pages than [`VTD_TABLES_PAGES`].
    #[error("the VT-d structures need more than {0} pages")]
    OutOfPages(u64),
    /// A PASID beyond what the directory covers.
    #[error("PASID {0:#x} is beyond the {MAX_PASIDS} PASIDs the directory covers")]
    PasidTooLarge(u32),
    /// A PASID entry for a device without a context entry.
    #[error("{0} has no context entry")]
    NoContext(PciAddress),
}

impl Default for ScalableTables {
    fn default() -> Self {
        Self::new(VTD_TABLES_START)
    }
}

impl ScalableTables {
    /// Structures starting at `base` (the root table's page).
    pub fn new(base: u64) -> Self {
        Self {
            base,
            pages: 1,
            directories: Vec::new(),
            pasid_tables: Vec::new(),
            context_tables: Vec::new(),
            stores: Vec::new(),
        }
    }

    /// The root table (RTADDR).
    pub fn root_table(&self) -> u64 {
        self.base
    }

    fn allocate(&mut self) -> Result<u64, TablesError> {
        if self.pages >= VTD_TABLES_PAGES {
            return Err(TablesError::OutOfPages(VTD_TABLES_PAGES));
        }
        let page = self.base + self.pages * 0x1000;
        self.pages += 1;
        Ok(page)
    }

    fn store(&mut self, addr: u64, qwords: &[u64]) {
        self.stores.push((addr, qwords.to_vec()));
    }

    /// The PASID directory of `rid`.
    pub fn pasid_directory(&self, rid: PciAddress) -> Option<u64> {
        self.directories
            .iter()
            .find(|(r, _)| *r == rid)
            .map(|&(_, d)| d)
    }

    /// Adds the context entry of `rid`: PASID enabled, a PASID directory
    /// of its own, RID_PASID 0, and `controls`.
    pub fn add_device(
        &mut self,
        rid: PciAddress,
        controls: ContextControls,
    ) -> Result<(), TablesError> {
        let (bus, devfn) = (rid.bus, rid.devfn());
        let upper = devfn >= 0x80;
        let table = match self
            .context_tables
            .iter()
            .find(|(b, u, _)| *b == bus && *u == upper)
        {
            Some(&(_, _, t)) => t,
            None => {
                let t = self.allocate()?;
                self.context_tables.push((bus, upper, t));
                let half = self.base + u64::from(bus) * RootEntry::SIZE + if upper { 8 } else { 0 };
                self.store(half, &[t | PRESENT]);
                t
            }
        };
        let directory = self.allocate()?;
        self.directories.push((rid, directory));
        let mut lo = directory | (PDTS << context::PDTS_SHIFT) | context::PASIDE | context::P;
        if controls.dte {
            lo |= context::DTE;
        }
        if controls.pre {
            lo |= context::PRE;
        }
        let entry = table + u64::from(devfn & 0x7f) * ContextEntry::SIZE;
        self.store(entry, &[lo, 0, 0, 0]);
        Ok(())
    }

    /// Adds `rid`'s PASID-table entry for `binding`: first-stage
    /// translation through the process's own page tables, user requests
    /// only (SRE clear), as Linux's intel_pasid_setup_first_level writes it.
    pub fn bind(
        &mut self,
        rid: PciAddress,
        binding: FirstStageBinding,
    ) -> Result<u64, TablesError> {
        if binding.pasid >= MAX_PASIDS {
            return Err(TablesError::PasidTooLarge(binding.pasid));
        }
        let directory = self
            .pasid_directory(rid)
            .ok_or(TablesError::NoContext(rid))?;
        let index = binding.pasid / PASIDS_PER_TABLE;
        let table = match self
            .pasid_tables
            .iter()
            .find(|(r, i, _)| *r == rid && *i == index)
        {
            Some(&(_, _, t)) => t,
            None => {
                let t = self.allocate()?;
                self.pasid_tables.push((rid, index, t));
                self.store(directory + u64::from(index) * 8, &[t | PRESENT]);
                t
            }
        };
        let entry = first_stage_entry(binding);
        let addr = table + u64::from(binding.pasid % PASIDS_PER_TABLE) * PasidEntry::SIZE;
        self.store(addr, &entry);
        Ok(addr)
    }

    /// Emits the guest code that zeroes the structures' pages and stores
    /// every entry.
    pub fn emit(&self, asm: &mut CodeAssembler) -> Result<(), IcedError> {
        zero_pages(asm, self.base, self.pages)?;
        for (addr, qwords) in &self.stores {
            store_qwords(asm, *addr, qwords)?;
        }
        Ok(())
    }
}

/// The 512-bit PASID-table entry of a first-stage user binding: P, AW,
/// PGTT=first stage, DID, PWSNP, NXE, FLPTR (4-level).
pub fn first_stage_entry(binding: FirstStageBinding) -> [u64; 8] {
    let mut e = [0u64; 8];
    e[0] = pasid_entry::P
        | (AW_48_BIT << pasid_entry::AW_SHIFT)
        | (PGTT_FIRST_STAGE << pasid_entry::PGTT_SHIFT);
    e[1] = (u64::from(binding.did) & pasid_entry::DID_MASK) | PWSNP;
    e[2] = (binding.flptr & !0xfff) | pasid_entry::NXE;
    e
}

/// Invalidation descriptors (VT-d 6.5.2), 256-bit.
pub mod qi {
    use super::desc_type;

    /// Granularity field (qw0 bits 5:4).
    fn granularity(g: u64) -> u64 {
        g << 4
    }

    /// Context-cache invalidation, global.
    pub fn context_global() -> [u64; 4] {
        [
            u64::from(desc_type::CONTEXT_CACHE) | granularity(1),
            0,
            0,
            0,
        ]
    }

    /// PASID-cache invalidation, all PASIDs of all domains.
    pub fn pasid_cache_global() -> [u64; 4] {
        [u64::from(desc_type::PASID_CACHE) | granularity(3), 0, 0, 0]
    }

    /// PASID-cache invalidation of one PASID in a domain.
    pub fn pasid_cache_pasid(did: u16, pasid: u32) -> [u64; 4] {
        [
            u64::from(desc_type::PASID_CACHE)
                | granularity(1)
                | (u64::from(did) << 16)
                | (u64::from(pasid) << 32),
            0,
            0,
            0,
        ]
    }

    /// IOTLB invalidation, global (with read and write draining).
    pub fn iotlb_global() -> [u64; 4] {
        const DRAIN_READS: u64 = 1 << 7;
        const DRAIN_WRITES: u64 = 1 << 6;
        [
            u64::from(desc_type::IOTLB) | granularity(1) | DRAIN_READS | DRAIN_WRITES,
            0,
            0,
            0,
        ]
    }

    /// PASID-based IOTLB invalidation of every translation of a PASID.
    pub fn piotlb_pasid(did: u16, pasid: u32) -> [u64; 4] {
        [
            u64::from(desc_type::PASID_IOTLB)
                | granularity(2)
                | (u64::from(did) << 16)
                | (u64::from(pasid) << 32),
            0,
            0,
            0,
        ]
    }

    /// Invalidation wait: status write of `data` to `status` and fence.
    pub fn wait(status: u64, data: u32) -> [u64; 4] {
        const STATUS_WRITE: u64 = 1 << 5;
        const FENCE: u64 = 1 << 6;
        [
            u64::from(desc_type::WAIT) | STATUS_WRITE | FENCE | (u64::from(data) << 32),
            status,
            0,
            0,
        ]
    }

    /// Page group response qw0 bits the response copies from the page
    /// request descriptor (requester ID 31:16 and PASID 51:32 sit at the
    /// same positions in both).
    pub const RESPONSE_QW0_FROM_REQUEST: u64 = (0xffff << 16) | (0xf_ffff << 32);
    /// Page group response qw1 bits copied from the request: PRG index
    /// (11:3) and LPIG (2).
    pub const RESPONSE_QW1_FROM_REQUEST: u64 = 0x1ff << 3 | 1 << 2;
    /// Page group response qw0 without the copied fields: type and PASID
    /// present; response code 0 (Success) in bits 15:12.
    pub const RESPONSE_QW0_SUCCESS: u64 = desc_type::PAGE_GROUP_RESPONSE as u64 | (1 << 4);
}

/// A descriptor to submit: computed by the host, or composed by guest code
/// at runtime in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QiDescriptor {
    /// These four quadwords.
    Fixed([u64; 4]),
    /// The 32 bytes the guest composed at this address.
    Composed(u64),
}

/// The guest driver of one remapping unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vtd {
    /// Register window.
    pub regs: u64,
    /// Invalidation queue page.
    pub queue: u64,
    /// Wait-descriptor status word.
    pub status: u64,
    /// Page request queue page.
    pub prq: u64,
}

impl Default for Vtd {
    fn default() -> Self {
        Self {
            regs: layout::VIOMMU_START,
            queue: INVALIDATION_QUEUE_START,
            status: QI_STATUS,
            prq: PAGE_REQUEST_QUEUE_START,
        }
    }
}

impl Vtd {
    fn reg(&self, offset: u64) -> u64 {
        self.regs + offset
    }

    /// Emits a GCMD write setting `bit` on top of the persistent command
    /// bits (TE, QIE) read back from GSTS, then polls GSTS for `bit`.
    fn global_command(
        &self,
        asm: &mut CodeAssembler,
        bit: u32,
        step: Step,
    ) -> Result<(), IcedError> {
        asm.mov(rdi, self.reg(GSTS))?;
        asm.mov(eax, dword_ptr(rdi))?;
        asm.and(eax, (gcmd::TE | gcmd::QIE) as i32)?;
        asm.or(eax, bit as i32)?;
        asm.mov(rdi, self.reg(GCMD))?;
        asm.mov(dword_ptr(rdi), eax)?;
        poll(
            asm,
            self.reg(GSTS),
            Width::Dword,
            bit,
            Until::Equals(bit),
            step,
        )
    }

    /// Emits the intel-iommu enable sequence: queued invalidation with
    /// 256-bit descriptors, the scalable-mode root table, the page request
    /// queue, global context/PASID/IOTLB invalidations, translation enable.
    /// GSTS lands in [`slot::GSTS`].
    pub fn enable(&self, asm: &mut CodeAssembler, root_table: u64) -> Result<(), IcedError> {
        zero_pages(asm, self.queue, 1)?;
        zero_pages(asm, self.prq, 1)?;
        super::write64(asm, self.reg(IQT), 0)?;
        super::write64(
            asm,
            self.reg(viommu::regs::IQA),
            self.queue | iqa::DW | IQA_QS,
        )?;
        self.global_command(asm, gcmd::QIE, Step::QueuedInvalidationEnable)?;

        super::write64(
            asm,
            self.reg(RTADDR),
            (root_table & rtaddr::RTA_MASK) | (rtaddr::TTM_SCALABLE << 10),
        )?;
        self.global_command(asm, gcmd::SRTP, Step::SetRootTablePointer)?;

        super::write64(asm, self.reg(PQH), 0)?;
        super::write64(asm, self.reg(PQT), 0)?;
        super::write64(asm, self.reg(PQA), (self.prq & pqa::BASE_MASK) | PQA_PQS)?;

        self.submit(
            asm,
            &[
                QiDescriptor::Fixed(qi::context_global()),
                QiDescriptor::Fixed(qi::pasid_cache_global()),
                QiDescriptor::Fixed(qi::iotlb_global()),
            ],
        )?;
        self.global_command(asm, gcmd::TE, Step::TranslationEnable)?;
        super::read32(asm, self.reg(GSTS))?;
        report(asm, slot::GSTS, rax)
    }

    /// Emits a submission of `descriptors` plus a wait descriptor at the
    /// tail read back from IQT, moves IQT, and polls the wait's status
    /// word (as qi_submit_sync does).
    pub fn submit(
        &self,
        asm: &mut CodeAssembler,
        descriptors: &[QiDescriptor],
    ) -> Result<(), IcedError> {
        let size = 0x1000u64 << IQA_QS;
        super::write32(asm, self.status, 0)?;
        // r11 = tail offset, rsi = its slot.
        asm.mov(rdi, self.reg(IQT))?;
        asm.mov(r11, qword_ptr(rdi))?;
        let wait = QiDescriptor::Fixed(qi::wait(self.status, QI_DONE));
        for d in descriptors.iter().chain(std::iter::once(&wait)) {
            asm.mov(rsi, self.queue)?;
            asm.add(rsi, r11)?;
            match d {
                QiDescriptor::Fixed(qwords) => {
                    for (i, q) in qwords.iter().enumerate() {
                        asm.mov(rax, *q)?;
                        asm.mov(qword_ptr(rsi + 8 * i as i32), rax)?;
                    }
                }
                QiDescriptor::Composed(at) => {
                    asm.mov(rdx, *at)?;
                    for i in 0..4 {
                        asm.mov(rax, qword_ptr(rdx + 8 * i))?;
                        asm.mov(qword_ptr(rsi + 8 * i), rax)?;
                    }
                }
            }
            asm.add(r11, QI_DESCRIPTOR_SIZE as i32)?;
            asm.and(r11, (size - 1) as i32)?;
        }
        asm.mov(rdi, self.reg(IQT))?;
        asm.mov(qword_ptr(rdi), r11)?;
        poll(
            asm,
            self.status,
            Width::Dword,
            u32::MAX,
            Until::Equals(QI_DONE),
            Step::InvalidationWait,
        )
    }

    /// Emits what a driver does after changing a PASID-table entry that
    /// may be cached: PASID-cache and PASID-based IOTLB invalidation.
    pub fn invalidate_pasid(
        &self,
        asm: &mut CodeAssembler,
        did: u16,
        pasid: u32,
    ) -> Result<(), IcedError> {
        self.submit(
            asm,
            &[
                QiDescriptor::Fixed(qi::pasid_cache_pasid(did, pasid)),
                QiDescriptor::Fixed(qi::piotlb_pasid(did, pasid)),
            ],
        )
    }

    /// Emits the service of one page request, as a fault handler would:
    /// waits for PQT to move past PQH, records the request's quadwords in
    /// [`slot::PRQ_QW0`]/[`slot::PRQ_QW1`], maps the requested page (it
    /// must lie in the micro-guest's 4 KiB-mapped data area: present,
    /// writable, user), moves PQH, clears PRS.PPR and answers with a
    /// Success page group response for the request's requester, PASID and
    /// page request group. [`slot::PRQ_SERVICED`] counts the requests.
    pub fn service_page_request(&self, asm: &mut CodeAssembler) -> Result<(), IcedError> {
        let size = 0x1000u64 << PQA_PQS;
        let mut in_data_area = asm.create_label();
        // Wait for a request: PQT != PQH.
        asm.mov(rdi, self.reg(PQH))?;
        asm.mov(rax, qword_ptr(rdi))?;
        asm.mov(r11, rax)?;
        asm.mov(rdi, self.reg(PQT))?;
        poll_differs_from_r11(asm)?;
        // rsi = the request.
        asm.mov(rsi, self.prq)?;
        asm.add(rsi, r11)?;
        asm.mov(rax, qword_ptr(rsi))?;
        report(asm, slot::PRQ_QW0, rax)?;
        asm.mov(rax, qword_ptr(rsi + 8))?;
        report(asm, slot::PRQ_QW1, rax)?;
        // Map the page: the PTE of the address in the data area's table.
        asm.mov(rax, qword_ptr(rsi + 8))?;
        asm.and(rax, !0xfff)?;
        asm.mov(rcx, rax)?;
        asm.mov(rdx, DATA_START)?;
        asm.sub(rcx, rdx)?;
        asm.cmp(rcx, 0x20_0000)?;
        asm.jb(in_data_area)?;
        fail_with_eax(asm, Step::PageRequestAddress)?;
        asm.set_label(&mut in_data_area)?;
        asm.shr(rcx, 12)?;
        asm.mov(rdx, DATA_PT_START)?;
        asm.lea(rdx, qword_ptr(rdx + rcx * 8))?;
        asm.mov(rcx, rax)?;
        asm.or(rcx, (PTE_P | PTE_W | PTE_U) as i32)?;
        asm.mov(qword_ptr(rdx), rcx)?;
        asm.invlpg(qword_ptr(rax))?;
        // Compose the response in the scratch page.
        asm.mov(rdx, QI_SCRATCH)?;
        asm.mov(rax, qword_ptr(rsi))?;
        asm.mov(rcx, qi::RESPONSE_QW0_FROM_REQUEST)?;
        asm.and(rax, rcx)?;
        asm.or(rax, qi::RESPONSE_QW0_SUCCESS as i32)?;
        asm.mov(qword_ptr(rdx), rax)?;
        asm.mov(rax, qword_ptr(rsi + 8))?;
        asm.and(rax, qi::RESPONSE_QW1_FROM_REQUEST as i32)?;
        asm.mov(qword_ptr(rdx + 8), rax)?;
        asm.xor(eax, eax)?;
        asm.mov(qword_ptr(rdx + 16), rax)?;
        asm.mov(qword_ptr(rdx + 24), rax)?;
        // Consume the request: PQH forward, PRS.PPR cleared.
        asm.add(r11, PRQ_DESCRIPTOR_SIZE as i32)?;
        asm.and(r11, (size - 1) as i32)?;
        asm.mov(rdi, self.reg(PQH))?;
        asm.mov(qword_ptr(rdi), r11)?;
        super::write32(asm, self.reg(PRS), prs::PPR)?;
        asm.mov(rdi, super::REPORT_START + 8 * slot::PRQ_SERVICED as u64)?;
        asm.inc(qword_ptr(rdi))?;
        self.submit(asm, &[QiDescriptor::Composed(QI_SCRATCH)])
    }
}

/// Emits a poll of the qword at `[rdi]` until it differs from `r11`
/// (bounded like [`super::poll_rdi`]; fails with
/// [`Step::PageRequestTimeout`]).
fn poll_differs_from_r11(asm: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut again = asm.create_label();
    let mut done = asm.create_label();
    super::start_deadline(asm)?;
    asm.set_label(&mut again)?;
    asm.mov(rax, qword_ptr(rdi))?;
    asm.cmp(rax, r11)?;
    asm.jne(done)?;
    super::before_deadline(asm, again)?;
    asm.mov(eax, r11d)?;
    fail_with_eax(asm, Step::PageRequestTimeout)?;
    asm.set_label(&mut done)
}

#[cfg(test)]
mod tests {
    use viommu::invalidation::{ContextScope, Descriptor, IotlbScope};
    use viommu::tables::Pgtt;
    use viommu::{PageGroupResponse, PageRequest, PasidCacheScope, PasidTag, ResponseCode};

    use super::*;

    #[test]
    fn descriptors_decode_as_the_unit_reads_them() {
        let decode = |qw| Descriptor::decode(qw, true).unwrap();
        assert_eq!(
            decode(qi::context_global()),
            Descriptor::ContextCache(ContextScope::Global)
        );
        assert_eq!(
            decode(qi::pasid_cache_global()),
            Descriptor::PasidCache(PasidCacheScope::Global)
        );
        assert_eq!(
            decode(qi::pasid_cache_pasid(7, 0x1234)),
            Descriptor::PasidCache(PasidCacheScope::Pasid {
                did: 7,
                pasid: 0x1234
            })
        );
        assert_eq!(
            decode(qi::iotlb_global()),
            Descriptor::Iotlb(IotlbScope::Global)
        );
        assert_eq!(
            decode(qi::piotlb_pasid(7, 0x1234)),
            Descriptor::PasidIotlb {
                did: 7,
                pasid: 0x1234,
                range: None
            }
        );
        assert_eq!(
            decode(qi::wait(0x41_1000, QI_DONE)),
            Descriptor::Wait {
                interrupt: false,
                status_write: true,
                fence: true,
                drain: false,
                status_data: QI_DONE,
                status_addr: 0x41_1000
            }
        );
    }

    #[test]
    fn the_page_group_response_echoes_the_request() {
        // What service_page_request computes from a queued request.
        let request = PageRequest {
            requester_id: pci::PciAddress::from_rid(0x0108),
            pasid: Some(PasidTag {
                pasid: 0xa_bcde,
                privileged: false,
            }),
            address: 0x7654_3000,
            read: true,
            write: true,
            execute: false,
            last_in_group: true,
            prg_index: 0x1ff,
            private_data: None,
        };
        let [qw0, qw1, _, _] = request.encode();
        let response = [
            (qw0 & qi::RESPONSE_QW0_FROM_REQUEST) | qi::RESPONSE_QW0_SUCCESS,
            qw1 & qi::RESPONSE_QW1_FROM_REQUEST,
            0,
            0,
        ];
        assert_eq!(
            Descriptor::decode(response, true),
            Ok(Descriptor::PageGroupResponse(PageGroupResponse {
                requester_id: pci::PciAddress::from_rid(0x0108),
                pasid: Some(0xa_bcde),
                prg_index: 0x1ff,
                code: ResponseCode::Success,
                private_data: None,
                from_hardware: false,
            }))
        );
    }

    #[test]
    fn first_stage_entry_decodes_as_a_user_binding() {
        let e = PasidEntry::decode(&first_stage_entry(FirstStageBinding {
            pasid: 3,
            flptr: 0x8000,
            did: 9,
        }))
        .unwrap();
        assert_eq!((e.pgtt, e.flptr, e.did), (Pgtt::FirstStage, 0x8000, 9));
        assert!(!e.sre && e.nxe && !e.fpd);
    }

    #[test]
    fn planning_errors() {
        let binding = |pasid| FirstStageBinding {
            pasid,
            flptr: 0x8000,
            did: 1,
        };
        let mut t = ScalableTables::default();
        let dev = PciAddress::from_rid(0x18);
        assert_eq!(t.bind(dev, binding(1)), Err(TablesError::NoContext(dev)));
        t.add_device(dev, ContextControls::default()).unwrap();
        assert_eq!(
            t.bind(dev, binding(MAX_PASIDS)),
            Err(TablesError::PasidTooLarge(MAX_PASIDS))
        );
        // Root, context table, directory: 13 PASID tables fit, the 14th not.
        for i in 0..13 {
            t.bind(dev, binding(i * PASIDS_PER_TABLE)).unwrap();
        }
        assert_eq!(
            t.bind(dev, binding(13 * PASIDS_PER_TABLE)),
            Err(TablesError::OutOfPages(VTD_TABLES_PAGES))
        );
        // Another PASID in an existing table needs no page.
        assert!(t.bind(dev, binding(5)).is_ok());
    }
}
