//! x86-64 architectural constants, the machine's one home for them (Intel
//! SDM Vol. 3A): RFLAGS bits, control-register and EFER bits, MSR indices,
//! exception vectors, segment selectors and descriptors, and page-table
//! entry bits. The emulator, the boot state and the micro-guest harness
//! take them from here; IA32_PASID's index and fields are the `pasid`
//! crate's.

/// RFLAGS bits (SDM Vol. 1, 3.4.3).
pub mod rflags {
    /// Carry flag.
    pub const CF: u64 = 1 << 0;
    /// Parity flag.
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry flag.
    pub const AF: u64 = 1 << 4;
    /// Zero flag.
    pub const ZF: u64 = 1 << 6;
    /// Sign flag.
    pub const SF: u64 = 1 << 7;
    /// Interrupt-enable flag.
    pub const IF: u64 = 1 << 9;
    /// Overflow flag.
    pub const OF: u64 = 1 << 11;
    /// Resume flag.
    pub const RF: u64 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u64 = 1 << 17;
    /// Bit 1, which always reads as 1.
    pub const FIXED: u64 = 1 << 1;
    /// Alignment-check / access-control flag (SMAP override).
    pub const AC: u64 = 1 << 18;
    /// The six status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
}

/// CR0 bits.
pub mod cr0 {
    /// Protected mode.
    pub const PE: u64 = 1 << 0;
    /// Extension type (always 1 on modern CPUs).
    pub const ET: u64 = 1 << 4;
    /// Native x87 error reporting.
    pub const NE: u64 = 1 << 5;
    /// Paging.
    pub const PG: u64 = 1 << 31;
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// Task switched.
    pub const TS: u64 = 1 << 3;
    /// Write protect: supervisor writes honour read-only pages.
    pub const WP: u64 = 1 << 16;
}

/// CR3: bits 51:12 hold the physical address of the root paging table.
pub const CR3_ROOT_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Every paging-structure table is one 4 KiB page.
pub const PAGE_TABLE_SIZE: u64 = 0x1000;

/// CR4 bits.
pub mod cr4 {
    /// Page size extensions: 4 MiB pages in 32-bit paging.
    pub const PSE: u64 = 1 << 4;
    /// Physical address extension, required for long mode.
    pub const PAE: u64 = 1 << 5;
    /// The OS supports FXSAVE/FXRSTOR (SSE).
    pub const OSFXSR: u64 = 1 << 9;
    /// The OS handles SIMD floating-point exceptions.
    pub const OSXMMEXCPT: u64 = 1 << 10;
    /// 57-bit linear addresses (5-level paging).
    pub const LA57: u64 = 1 << 12;
    /// XSAVE and processor extended states enabled.
    pub const OSXSAVE: u64 = 1 << 18;
    /// Supervisor-mode execution prevention.
    pub const SMEP: u64 = 1 << 20;
    /// Supervisor-mode access prevention.
    pub const SMAP: u64 = 1 << 21;
}

/// IA32_EFER bits.
pub mod efer {
    /// SYSCALL/SYSRET enable.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
    /// Execute-disable bit enable.
    pub const NXE: u64 = 1 << 11;
}

/// Exception vectors.
pub mod vector {
    /// #DB, debug (INT1, single step, debug registers).
    pub const DB: u8 = 1;
    /// #BP, breakpoint (INT3).
    pub const BP: u8 = 3;
    /// #UD, invalid opcode.
    pub const UD: u8 = 6;
    /// #NM, device not available.
    pub const NM: u8 = 7;
    /// #DF, double fault.
    pub const DF: u8 = 8;
    /// #TS, invalid TSS.
    pub const TS: u8 = 10;
    /// #NP, segment not present.
    pub const NP: u8 = 11;
    /// #SS, stack-segment fault.
    pub const SS: u8 = 12;
    /// #GP, general protection.
    pub const GP: u8 = 13;
    /// #PF, page fault.
    pub const PF: u8 = 14;
    /// #AC, alignment check.
    pub const AC: u8 = 17;
    /// #CP, control protection.
    pub const CP: u8 = 21;
    /// #VC, VMM communication.
    pub const VC: u8 = 29;
    /// #SX, security exception.
    pub const SX: u8 = 30;

    /// Whether the CPU pushes an error code when it delivers `v`.
    pub fn has_error_code(v: u8) -> bool {
        matches!(v, DF | TS | NP | SS | GP | PF | AC | CP | VC | SX)
    }
}

/// Requested-privilege-level bits of a segment selector.
pub const SELECTOR_RPL_MASK: u16 = 3;
/// Table-indicator bit of a segment selector (1: LDT).
pub const SELECTOR_TI: u16 = 1 << 2;

/// Segment descriptors (SDM Vol. 3A, 3.4.5).
pub mod segment {
    use kvm_bindings::kvm_segment;

    /// A segment descriptor in the GDT. Code and data descriptors are flat
    /// (base 0); a system descriptor's base goes in with
    /// [`SegmentDescriptor::to_system_u64`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SegmentDescriptor {
        /// Limit in units of the granularity (20 bits).
        pub limit: u32,
        /// Type field (bits 43:40).
        pub kind: u8,
        /// S: code/data (true) or system (false).
        pub code_or_data: bool,
        /// DPL (bits 46:45).
        pub dpl: u8,
        /// L: 64-bit code segment.
        pub long: bool,
        /// D/B: 32-bit default operand size.
        pub default_32: bool,
        /// G: limit in 4 KiB units.
        pub granularity_4k: bool,
    }

    /// Segment types.
    pub mod kind {
        /// Code: execute/read, accessed.
        pub const CODE_EXEC_READ_ACCESSED: u8 = 0xb;
        /// Data: read/write, accessed.
        pub const DATA_READ_WRITE_ACCESSED: u8 = 0x3;
        /// System: 64-bit TSS, available.
        pub const TSS64_AVAILABLE: u8 = 0x9;
        /// System: 64-bit TSS, busy.
        pub const TSS64_BUSY: u8 = 0xb;
        /// In a code or data type: the code (bit 3) and conforming (bit 2)
        /// bits, both set in a conforming code segment.
        pub const CODE_CONFORMING: u8 = 0b1100;
        /// In a code or data type: a code segment.
        pub const CODE: u8 = 1 << 3;
        /// In a data type: expand-down (in a code type: conforming).
        pub const EXPAND_DOWN: u8 = 1 << 2;
        /// In a data type: writable (in a code type: readable).
        pub const WRITABLE: u8 = 1 << 1;
    }

    /// Flat 64-bit code at `dpl`.
    pub const fn code64(dpl: u8) -> SegmentDescriptor {
        SegmentDescriptor {
            limit: 0xf_ffff,
            kind: kind::CODE_EXEC_READ_ACCESSED,
            code_or_data: true,
            dpl,
            long: true,
            default_32: false,
            granularity_4k: true,
        }
    }

    /// Flat 32-bit code at `dpl` (L=0, D=1): in long mode, a
    /// compatibility-mode code segment.
    pub const fn code32(dpl: u8) -> SegmentDescriptor {
        SegmentDescriptor {
            limit: 0xf_ffff,
            kind: kind::CODE_EXEC_READ_ACCESSED,
            code_or_data: true,
            dpl,
            long: false,
            default_32: true,
            granularity_4k: true,
        }
    }

    /// 64 KiB of 16-bit code at `dpl` (L=0, D=0, byte granularity).
    pub const fn code16(dpl: u8) -> SegmentDescriptor {
        SegmentDescriptor {
            limit: 0xffff,
            kind: kind::CODE_EXEC_READ_ACCESSED,
            code_or_data: true,
            dpl,
            long: false,
            default_32: false,
            granularity_4k: false,
        }
    }

    /// Flat read/write data at `dpl`.
    pub const fn data(dpl: u8) -> SegmentDescriptor {
        SegmentDescriptor {
            limit: 0xf_ffff,
            kind: kind::DATA_READ_WRITE_ACCESSED,
            code_or_data: true,
            dpl,
            long: false,
            default_32: true,
            granularity_4k: true,
        }
    }

    /// A 64-bit TSS of `limit + 1` bytes, of type `kind` (available or
    /// busy).
    pub const fn tss64(limit: u32, kind: u8) -> SegmentDescriptor {
        SegmentDescriptor {
            limit,
            kind,
            code_or_data: false,
            dpl: 0,
            long: false,
            default_32: false,
            granularity_4k: false,
        }
    }

    impl SegmentDescriptor {
        /// The fields of the 8-byte descriptor `desc` (its base and present
        /// bit are not kept).
        pub fn from_u64(desc: u64) -> Self {
            let access = (desc >> 40) as u8;
            let flags = (desc >> 52) as u8;
            SegmentDescriptor {
                limit: ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32,
                kind: access & 0xf,
                code_or_data: access & (1 << 4) != 0,
                dpl: (access >> 5) & 3,
                long: flags & (1 << 1) != 0,
                default_32: flags & (1 << 2) != 0,
                granularity_4k: flags & (1 << 3) != 0,
            }
        }

        /// The limit in bytes minus one: the limit field, scaled to 4 KiB
        /// units when G is set.
        pub fn byte_limit(self) -> u32 {
            if self.granularity_4k {
                (self.limit << 12) | 0xfff
            } else {
                self.limit
            }
        }

        /// A conforming code segment.
        pub fn is_conforming_code(self) -> bool {
            self.code_or_data && self.kind & kind::CODE_CONFORMING == kind::CODE_CONFORMING
        }

        /// The 8-byte descriptor (present, base 0).
        pub fn to_u64(self) -> u64 {
            let limit = u64::from(self.limit & 0xf_ffff);
            let present = 1 << 7;
            let access = u64::from(self.kind & 0xf)
                | (u64::from(self.code_or_data) << 4)
                | (u64::from(self.dpl & 3) << 5)
                | present;
            let flags = (u64::from(self.long) << 1)
                | (u64::from(self.default_32) << 2)
                | (u64::from(self.granularity_4k) << 3);
            (limit & 0xffff) | ((limit >> 16) << 48) | (access << 40) | (flags << 52)
        }

        /// The 8-byte descriptor (present) of a code or data segment at
        /// `base` (outside 64-bit mode, bases apply to every segment).
        pub fn to_u64_at(self, base: u32) -> u64 {
            let base = u64::from(base);
            self.to_u64() | ((base & 0xff_ffff) << 16) | ((base >> 24) << 56)
        }

        /// The 16-byte form of a system descriptor (TSS, LDT) at `base`:
        /// two GDT entries.
        pub fn to_system_u64(self, base: u64) -> [u64; 2] {
            let low = self.to_u64_at(base as u32);
            [low, base >> 32]
        }

        /// The same segment as KVM's segment-register state, loaded with
        /// `selector` (base 0).
        pub fn to_kvm_segment(self, selector: u16) -> kvm_segment {
            kvm_segment {
                base: 0,
                limit: self.byte_limit(),
                selector,
                type_: self.kind,
                present: 1,
                dpl: self.dpl & 3,
                db: u8::from(self.default_32),
                s: u8::from(self.code_or_data),
                l: u8::from(self.long),
                g: u8::from(self.granularity_4k),
                avl: 0,
                unusable: 0,
                padding: 0,
            }
        }
    }
}

/// The ENDBR64 instruction (CET), which Linux puts at every entry point.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// MSR indices (SDM Vol. 4, table 2-2).
pub mod msr {
    /// IA32_STAR: bits 47:32 the kernel CS selector (SS is CS + 8).
    pub const STAR: u32 = 0xc000_0081;
    /// IA32_LSTAR: the 64-bit SYSCALL entry point.
    pub const LSTAR: u32 = 0xc000_0082;
    /// IA32_FMASK: RFLAGS bits SYSCALL clears.
    pub const FMASK: u32 = 0xc000_0084;
    /// IA32_PASID (its fields: [`pasid::Ia32Pasid`]).
    pub use pasid::MSR_IA32_PASID as IA32_PASID;
}

/// Paging-structure entry bits (4-level paging).
pub mod pte {
    /// Present.
    pub const PRESENT: u64 = 1 << 0;
    /// Writable.
    pub const WRITABLE: u64 = 1 << 1;
    /// User-accessible.
    pub const USER: u64 = 1 << 2;
    /// In a PDPT or page-directory entry: maps a 1 GiB or 2 MiB page.
    pub const PAGE_SIZE: u64 = 1 << 7;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_descriptors_encode_as_linux_writes_them() {
        // Linux's GDT_ENTRY_INIT values for __KERNEL_CS, __KERNEL_DS,
        // __USER_DS and __USER_CS in 64-bit mode.
        assert_eq!(segment::code64(0).to_u64(), 0x00af_9b00_0000_ffff);
        assert_eq!(segment::data(0).to_u64(), 0x00cf_9300_0000_ffff);
        assert_eq!(segment::data(3).to_u64(), 0x00cf_f300_0000_ffff);
        assert_eq!(segment::code64(3).to_u64(), 0x00af_fb00_0000_ffff);
        let tss = segment::tss64(0x67, segment::kind::TSS64_AVAILABLE);
        assert_eq!(
            tss.to_system_u64(0x1234_5678_9abc_d000),
            [0x9a00_89bc_d000_0067, 0x1234_5678]
        );
        for desc in [segment::code64(3), segment::data(0), tss] {
            assert_eq!(segment::SegmentDescriptor::from_u64(desc.to_u64()), desc);
        }
        assert!(!segment::code64(0).is_conforming_code());
        let user = segment::code64(3).to_kvm_segment(0x33);
        assert_eq!(
            (user.dpl, user.limit, user.l, user.db),
            (3, 0xffff_ffff, 1, 0)
        );
    }

    #[test]
    fn error_code_vectors() {
        assert!(vector::has_error_code(vector::GP));
        assert!(vector::has_error_code(vector::PF));
        assert!(!vector::has_error_code(vector::UD));
        assert!(!vector::has_error_code(vector::BP));
    }
}
