//! Where the vCPU fetches next and what a CPU in IA-32e mode touches to
//! deliver an exception, looked up in guest memory under a given vCPU
//! state: the IDT, the gates of #DF, #GP and #PF and their handlers, the
//! TSS with its RSP0 and IST stacks, and the current stack. A triple fault
//! means even #DF could not be delivered; on a KVM that resets the vCPU at
//! the shutdown the VMM only has the state it last resumed the vCPU with,
//! and guest memory, which the shutdown leaves alone. This says which of
//! those structures are still reachable under that state, so a report can
//! tell a broken table or mapping from a broken stack.
//!
//! Every access is a supervisor-implicit read or a translation without
//! accessed/dirty updates: the guest's memory is not changed.

use std::fmt::Write;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::GuestMemoryMmap;

use super::context::{CpuContext, CpuFeatures};
use super::entry::Gate64;
use super::mmu::{read_linear, translate, AccessError, AccessKind, Privilege};
use super::top_level_tables::{kernel_half, KERNEL_HALF_FIRST, TOP_LEVEL_ENTRIES};
use crate::x86::{efer, vector, CR3_ROOT_MASK};

/// 64-bit TSS: RSP0 at byte 4, IST1..IST7 from byte 0x24 (SDM Vol. 3A, 8.7).
const TSS_RSP0: u64 = 4;
const TSS_IST1: u64 = 0x24;
/// The vectors whose delivery decides between a handled fault, a double
/// fault and a triple fault.
const VECTORS: [(u8, &str); 3] = [
    (vector::DF, "#DF"),
    (vector::GP, "#GP"),
    (vector::PF, "#PF"),
];

/// Describes, one line each, how the IDT, the #DF/#GP/#PF gates and
/// handlers, the TSS's stacks and the current stack translate under
/// `regs`/`sregs` in `mem`.
pub fn describe_delivery_path(
    mem: &GuestMemoryMmap,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    phys_addr_bits: u8,
    page_1g: bool,
) -> String {
    let ctx = CpuContext {
        regs: *regs,
        sregs: *sregs,
        features: CpuFeatures {
            phys_addr_bits,
            page_1g,
        },
    };
    let mut s = String::from("exception delivery path under that state:");
    if sregs.efer & efer::LMA == 0 {
        s += " not in IA-32e mode, not examined";
        return s;
    }
    // The next fetch: a resume whose first fetch faults shuts down there.
    let _ = write!(
        s,
        "\n  RIP {:#x}: {}",
        regs.rip,
        where_is(mem, &ctx, regs.rip, AccessKind::Fetch)
    );
    let idt = sregs.idt;
    let _ = write!(
        s,
        "\n  IDT {:#x} limit {:#x}: {}",
        idt.base,
        idt.limit,
        where_is(mem, &ctx, idt.base, AccessKind::Read)
    );
    let mut stacks = Vec::new();
    for (v, name) in VECTORS {
        let _ = write!(s, "\n  {name} gate: ");
        let Some(at) = Gate64::address(idt.base, idt.limit, v) else {
            s += "beyond the IDT's limit";
            continue;
        };
        let mut raw = [0u8; Gate64::SIZE as usize];
        if let Err(e) = read_implicit(mem, &ctx, at, &mut raw) {
            let _ = write!(s, "unreadable at {at:#x}: {}", describe_error(e));
            continue;
        }
        let (lo, hi) = raw.split_at(8);
        let quad = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let gate = Gate64::from_quads(quad(lo), quad(hi));
        if !gate.present {
            let _ = write!(s, "not present ({:#018x})", quad(lo));
            continue;
        }
        let (handler, ist) = (gate.handler, gate.ist);
        let _ = write!(
            s,
            "handler {handler:#x} ({}), selector {:#x}, IST {ist}",
            where_is(mem, &ctx, handler, AccessKind::Fetch),
            gate.selector
        );
        if !stacks.contains(&ist) {
            stacks.push(ist);
        }
    }
    let tss = sregs.tr.base;
    let _ = write!(
        s,
        "\n  TSS {tss:#x}: {}",
        where_is(mem, &ctx, tss, AccessKind::Read)
    );
    stacks.sort_unstable();
    for ist in stacks {
        let (name, field) = match ist {
            0 => ("RSP0".to_string(), TSS_RSP0),
            n => (
                format!("IST{n}"),
                TSS_IST1 + 8 * u64::from(n.saturating_sub(1)),
            ),
        };
        let mut top = [0u8; 8];
        match read_implicit(mem, &ctx, tss.wrapping_add(field), &mut top) {
            Ok(()) => {
                let top = u64::from_le_bytes(top);
                let _ = write!(
                    s,
                    "\n  TSS {name} {top:#x}: the word below it {}",
                    where_is(mem, &ctx, top.wrapping_sub(8), AccessKind::Write)
                );
            }
            Err(e) => {
                let _ = write!(s, "\n  TSS {name}: unreadable: {}", describe_error(e));
            }
        }
    }
    let _ = write!(
        s,
        "\n  current stack RSP {:#x}: the word below it {}",
        regs.rsp,
        where_is(mem, &ctx, regs.rsp.wrapping_sub(8), AccessKind::Write)
    );
    write_kernel_half(&mut s, mem, sregs.cr3 & CR3_ROOT_MASK);
    s
}

/// The top-level table's kernel half (entries 256-511, which map the
/// kernel's text, the IDT, GDT and TSS): its non-zero entries, and how many
/// are zero. Every process's table carries copies of the same entries.
fn write_kernel_half(s: &mut String, mem: &GuestMemoryMmap, root: u64) {
    let Some(half) = kernel_half(mem, root) else {
        let _ = write!(s, "\n  top-level table at GPA {root:#x}: not RAM");
        return;
    };
    let zero = half.iter().filter(|&&e| e == 0).count();
    let mut present = String::new();
    for (i, e) in half.iter().enumerate().filter(|(_, &e)| e != 0) {
        let _ = write!(present, " [{}] {e:#x}", KERNEL_HALF_FIRST + i);
    }
    let _ = write!(
        s,
        "\n  top-level table at GPA {root:#x}, kernel half: {zero} of {} entries zero",
        TOP_LEVEL_ENTRIES - KERNEL_HALF_FIRST
    );
    if !present.is_empty() {
        let _ = write!(s, "; the others:{present}");
    }
}

fn read_implicit(
    mem: &GuestMemoryMmap,
    ctx: &CpuContext,
    va: u64,
    buf: &mut [u8],
) -> Result<(), AccessError> {
    read_linear(mem, ctx, va, buf, AccessKind::Read, Privilege::Implicit)
}

/// "at GPA ..." or the fault a supervisor access of `kind` at `va` takes.
fn where_is(mem: &GuestMemoryMmap, ctx: &CpuContext, va: u64, kind: AccessKind) -> String {
    // Implicit: no accessed/dirty updates, SMAP as for the CPU's own
    // accesses; a fetch is checked as one (NX, SMEP).
    let privilege = if kind == AccessKind::Fetch {
        Privilege::Supervisor
    } else {
        Privilege::Implicit
    };
    match translate(mem, ctx, va, kind, privilege) {
        Ok(gpa) => format!("at GPA {gpa:#x}"),
        Err(e) => describe_error(e),
    }
}

fn describe_error(e: AccessError) -> String {
    match e {
        AccessError::Fault(x) => format!("faults: {x:?}"),
        AccessError::NotRam { gpa } => format!("at GPA {gpa:#x}, not RAM"),
        AccessError::Contended => "page tables changing".to_string(),
    }
}
