//! Micro-guests on KVM: the harness's basic abilities.
//! These tests need /dev/kvm and fail with a message saying so without it.

use iced_x86::code_asm::*;
use microguest::{
    self, enter_user, exit_with, MicroGuest, MicroOptions, DEFAULT_HANDLER_RESULT, TEST_MMIO_START,
    USER_CS, USER_STACK_TOP,
};
use vm_memory::Bytes;
use vmm::vm::RunExit;

fn run(guest: MicroGuest) -> RunExit {
    microguest::require_kvm();
    microguest::run(guest, MicroOptions::default())
        .expect("micro-guest machine")
        .exit
}

#[test]
fn port_io_reports_the_result() {
    let mut g = MicroGuest::new();
    exit_with(&mut g.asm, 0x1234_5678).unwrap();
    assert_eq!(run(g), RunExit::TestExit(0x1234_5678));
}

#[test]
fn mmio_read_and_write_reach_the_test_device() {
    let mut g = MicroGuest::new();
    let a = &mut g.asm;
    a.mov(rbx, TEST_MMIO_START).unwrap();
    a.mov(eax, dword_ptr(rbx)).unwrap(); // the magic "TEST"
    a.mov(dword_ptr(rbx + 8), 0x55aa_1234u32).unwrap();
    a.add(eax, dword_ptr(rbx + 8)).unwrap();
    a.out(0xf4, eax).unwrap();
    a.hlt().unwrap();
    assert_eq!(
        run(g),
        RunExit::TestExit(0x5453_4554u32.wrapping_add(0x55aa_1234))
    );
}

#[test]
fn exception_reaches_the_guests_own_handler() {
    let mut g = MicroGuest::new();
    let mut handler = g.asm.create_label();
    g.asm.xor(edx, edx).unwrap();
    g.asm.div(edx).unwrap(); // #DE
    exit_with(&mut g.asm, 1).unwrap();
    g.asm.set_label(&mut handler).unwrap();
    // The frame's RIP is the faulting instruction.
    g.asm.mov(rax, qword_ptr(rsp)).unwrap();
    g.asm.sub(eax, microguest::CODE_START as u32).unwrap();
    g.asm.or(eax, 0xde00u32).unwrap();
    g.asm.out(0xf4, eax).unwrap();
    g.asm.hlt().unwrap();
    g.handler(0, handler);
    assert_eq!(
        run(g),
        RunExit::TestExit(0xde02),
        "div edx sits 2 bytes into the program"
    );
}

#[test]
fn unhandled_vector_reports_through_the_default_handler() {
    let mut g = MicroGuest::new();
    g.asm.ud2().unwrap();
    assert_eq!(run(g), RunExit::TestExit(DEFAULT_HANDLER_RESULT | 6));
}

#[test]
fn switch_to_cpl3_and_back() {
    let mut g = MicroGuest::new();
    let mut user = g.asm.create_label();
    let mut back = g.asm.create_label();
    enter_user(&mut g.asm, user, USER_STACK_TOP).unwrap();
    g.asm.set_label(&mut user).unwrap();
    g.asm.mov(ecx, cs).unwrap(); // CPL3 reads its own selector
    g.asm.hlt().unwrap(); // privileged: #GP back to CPL0
    g.asm.set_label(&mut back).unwrap();
    // #GP frame: error code, RIP, CS, ...; report the user CS and ECX.
    g.asm.mov(rax, qword_ptr(rsp + 16)).unwrap();
    g.asm.shl(ecx, 16).unwrap();
    g.asm.or(eax, ecx).unwrap();
    g.asm.out(0xf4, eax).unwrap();
    g.asm.hlt().unwrap();
    g.handler(13, back);
    let expected = (u32::from(USER_CS) << 16) | u32::from(USER_CS);
    assert_eq!(run(g), RunExit::TestExit(expected));
}

#[test]
fn msi_from_a_device_reaches_the_guest_idt() {
    use vmm::msi::KvmMsiSink;

    microguest::require_kvm();
    // The guest enables its LAPIC, sets IF and waits; vector 0x40 ends the run.
    const LAPIC_SVR: u64 = 0xfee0_00f0;
    let mut g = MicroGuest::new();
    let mut handler = g.asm.create_label();
    let mut wait = g.asm.create_label();
    g.asm.mov(rbx, LAPIC_SVR).unwrap();
    g.asm.mov(dword_ptr(rbx), 0x1ffu32).unwrap(); // APIC software enable, spurious 0xff
    g.asm.sti().unwrap();
    g.asm.set_label(&mut wait).unwrap();
    g.asm.mov(eax, 0x1u32).unwrap();
    g.asm.out(0x80, eax).unwrap(); // an exit, so the VMM thread can inject meanwhile
    g.asm.jmp(wait).unwrap();
    g.asm.set_label(&mut handler).unwrap();
    exit_with(&mut g.asm, 0x4040).unwrap();
    g.handler(0x40, handler);

    let mut machine = microguest::machine(&MicroOptions::default()).unwrap();
    let loaded = g.load(machine.memory()).unwrap();
    machine.set_boot_state(loaded.regs, loaded.sregs);
    let sink = KvmMsiSink::new(machine.vm().fd().clone());
    let sender = std::thread::spawn(move || {
        for _ in 0..200 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            // Fixed delivery to APIC 0, vector 0x40.
            pci::MsiSink::send_msi(
                &sink,
                pci::MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x40,
                },
            );
        }
    });
    let exit = machine
        .run(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    drop(sender);
    assert_eq!(exit, RunExit::TestExit(0x4040));
}

/// The trap benchmark runs to its end and leaves one positive TSC delta
/// per batch (its ratio is printed by `vmm bench`, never asserted).
#[test]
fn trap_benchmark_records_every_round() {
    let per_round = 50;
    let guest = microguest::demos::trap_benchmark(per_round).expect("assemble");
    let run = microguest::run(guest, Default::default()).expect("run");
    assert_eq!(run.exit, vmm::vm::RunExit::TestExit(0xbe));
    let bench = microguest::demos::TrapBench::from_memory(&run.memory, per_round);
    assert_eq!(bench.rounds.len(), microguest::demos::BENCH_ROUNDS as usize);
    assert!(
        bench.rounds.iter().all(|&(pio, enq)| pio > 0 && enq > 0),
        "{:?}",
        bench.rounds
    );
}

/// The accelerator benchmark runs to its end on the vIOMMU + vDSA machine:
/// every 1 MiB MEMMOVE succeeds and copies, some ENQCMDs are accepted, and
/// the device's DMA carried the host PASID of the guest's PASID.
#[test]
fn sva_benchmark_copies_and_submits() {
    use microguest::sva_bench::{self, SvaBench};
    let per_round = 20;
    let guest = sva_bench::program(per_round).expect("assemble");
    let run = microguest::run(guest, sva_bench::options()).expect("run");
    assert_eq!(run.exit, RunExit::TestExit(sva_bench::DONE));
    let bench = SvaBench::from_memory(&run.memory, per_round);
    assert!(bench.rounds.iter().all(|r| r.status == 1), "{bench:?}");
    let (issued, accepted) = bench.submissions();
    assert_eq!(issued, u64::from(per_round * sva_bench::ROUNDS));
    assert!(accepted > 0, "{bench:?}");
    let mut copied = vec![0u8; sva_bench::COPY_LEN as usize];
    run.memory
        .read_slice(&mut copied, vm_memory::GuestAddress(sva_bench::DST_DSA))
        .unwrap();
    assert!(copied
        .chunks(8)
        .all(|q| q == sva_bench::PATTERN.to_le_bytes()));
    let host = run
        .pasids
        .table()
        .translate(sva_bench::PASID)
        .expect("mapped");
    assert!(run.pasids.device_requests().iter().all(|&(_, h)| h == host));
    assert!(run.tsc_khz > 0);
}

/// A #DB handler that exits with `0xdb00 | DR6.BS << 4 | CPL of the
/// interrupted code`, and a #UD handler (so the VMM watches exception
/// entries with hardware breakpoints, as it does for every Linux guest).
fn debug_handlers(g: &mut MicroGuest) {
    let mut db = g.asm.create_label();
    g.asm.set_label(&mut db).unwrap();
    g.asm.mov(rax, dr6).unwrap();
    g.asm.shr(eax, 14).unwrap();
    g.asm.and(eax, 1).unwrap();
    g.asm.shl(eax, 4).unwrap();
    g.asm.mov(rcx, qword_ptr(rsp + 8)).unwrap(); // frame CS
    g.asm.and(ecx, 3).unwrap();
    g.asm.or(eax, ecx).unwrap();
    g.asm.or(eax, 0xdb00).unwrap();
    g.asm.out(0xf4, eax).unwrap();
    g.asm.hlt().unwrap();
    g.handler(1, db);
    let mut ud = g.asm.create_label();
    g.asm.set_label(&mut ud).unwrap();
    g.asm.endbr64().unwrap();
    exit_with(&mut g.asm, 0xbad6).unwrap();
    g.handler(6, ud);
}

/// Emits a single step: TF set by POPFQ traps after the next instruction.
fn single_step(a: &mut CodeAssembler) {
    a.pushfq().unwrap();
    a.or(qword_ptr(rsp), 0x100).unwrap();
    a.popfq().unwrap();
    a.nop().unwrap();
    exit_with(a, 0x5700).unwrap();
}

#[test]
fn a_kernel_single_step_reaches_the_guests_debug_handler() {
    // With hardware breakpoints in use KVM brings every #DB to the VMM; a
    // guest's own (here TF) must still reach the guest, DR6.BS set.
    let mut g = MicroGuest::new();
    single_step(&mut g.asm);
    debug_handlers(&mut g);
    assert_eq!(run(g), RunExit::TestExit(0xdb10));
}

#[test]
fn a_user_single_step_reaches_the_guests_debug_handler() {
    let mut g = MicroGuest::new();
    let mut user = g.asm.create_label();
    enter_user(&mut g.asm, user, USER_STACK_TOP).unwrap();
    g.asm.set_label(&mut user).unwrap();
    single_step(&mut g.asm);
    debug_handlers(&mut g);
    assert_eq!(run(g), RunExit::TestExit(0xdb13));
}

#[test]
fn icebp_reaches_the_guests_debug_handler() {
    let mut g = MicroGuest::new();
    g.asm.int1().unwrap();
    exit_with(&mut g.asm, 0x5700).unwrap();
    debug_handlers(&mut g);
    assert_eq!(run(g), RunExit::TestExit(0xdb00));
}

#[test]
fn user_icebp_reaches_the_guests_debug_handler() {
    let mut g = MicroGuest::new();
    let mut user = g.asm.create_label();
    enter_user(&mut g.asm, user, USER_STACK_TOP).unwrap();
    g.asm.set_label(&mut user).unwrap();
    g.asm.int1().unwrap();
    exit_with(&mut g.asm, 0x5700).unwrap();
    debug_handlers(&mut g);
    assert_eq!(run(g), RunExit::TestExit(0xdb03));
}

/// The VMM's error-level log records (the triple-fault report is one), as
/// `vmm`'s logger would print them on stderr.
struct ErrorRecords(std::sync::Mutex<Vec<String>>);

impl log::Log for ErrorRecords {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Error
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            self.0.lock().unwrap().push(record.args().to_string());
        }
    }

    fn flush(&self) {}
}

static ERROR_RECORDS: ErrorRecords = ErrorRecords(std::sync::Mutex::new(Vec::new()));

/// A guest that triple-faults gets a report: its registers, descriptor
/// tables and events, the state the VMM last resumed it with and its last
/// exits. The guest loads an empty IDT, leaves to the VMM with an OUT
/// (which the report must list at its RIP) and executes UD2: #UD cannot be
/// delivered, nor the #GP and #DF that follow.
#[test]
fn triple_fault_reports_the_vcpu_state_and_its_last_exits() {
    let _ = log::set_logger(&ERROR_RECORDS);
    log::set_max_level(log::LevelFilter::Error);
    let mut g = MicroGuest::new();
    let a = &mut g.asm;
    a.push(0).unwrap(); // 2 bytes
    a.push(0).unwrap(); // 2 bytes: a zero IDT pseudo-descriptor at RSP
    a.lidt(ptr(rsp)).unwrap(); // 4 bytes
    a.out(0x80, al).unwrap(); // 2 bytes, at CODE_START + 8
    a.ud2().unwrap(); // at CODE_START + 10
    assert_eq!(run(g), RunExit::TripleFault);
    let out_rip = microguest::CODE_START + 8;
    let ud2_rip = microguest::CODE_START + 10;
    let records = ERROR_RECORDS.0.lock().unwrap();
    let report = records
        .iter()
        .find(|r| r.starts_with("vCPU 0: KVM_EXIT_SHUTDOWN (triple fault)"))
        .unwrap_or_else(|| panic!("no triple-fault report among {records:#?}"));
    let section = |title: &str| -> &str {
        let start = report
            .find(title)
            .unwrap_or_else(|| panic!("no '{title}' in:\n{report}"));
        let rest = &report[start..];
        let end = rest[1..].find("\nvCPU state").map_or(rest.len(), |e| e + 1);
        let end = end.min(rest.find("\nlast ").unwrap_or(rest.len()));
        &rest[..end]
    };
    // The state now: KVM's, which some KVMs reset to INIT at a shutdown.
    let now = section("vCPU state at the shutdown:");
    for label in [
        "RAX",
        "R15",
        "RFLAGS",
        "CS ",
        "SS ",
        "TR ",
        "CR0",
        "CR2",
        "CR3",
        "CR4",
        "EFER",
        "GDT",
        "events: exception injected",
    ] {
        assert!(now.contains(label), "no {label} in:\n{report}");
    }
    if now.contains("the INIT state") {
        assert!(now.contains("RIP 0x000000000000fff0 "), "{report}");
    } else {
        assert!(now.contains(&format!("RIP {ud2_rip:#018x} ")), "{report}");
        assert!(
            now.contains("IDT base 0x0000000000000000 limit 0x0000"),
            "{report}"
        );
    }
    // What the VMM resumed it with after the OUT: the empty IDT, long mode.
    let resumed = section("vCPU state the VMM last resumed it with");
    assert!(
        resumed.contains("IDT base 0x0000000000000000 limit 0x0000"),
        "{report}"
    );
    assert!(resumed.contains("EFER 0x"), "{report}");
    // Why nothing could be delivered, read from guest memory under that
    // state: the empty IDT has no gate for #DF, #GP or #PF; the current
    // stack is the harness's, mapped.
    let path = section("exception delivery path under that state:");
    for gate in ["#DF", "#GP", "#PF"] {
        assert!(
            path.contains(&format!("\n  {gate} gate: beyond the IDT's limit")),
            "{report}"
        );
    }
    assert!(path.contains("\n  IDT 0x0 limit 0x0: "), "{report}");
    // The resumed RIP is the OUT's where KVM completes port I/O at the
    // next entry (SVM), the UD2's where it did so before the exit (PVM);
    // the micro-guest's code is identity-mapped.
    assert!(
        [out_rip, ud2_rip]
            .iter()
            .any(|rip| path.contains(&format!("\n  RIP {rip:#x}: at GPA {rip:#x}\n"))),
        "{report}"
    );
    assert!(
        path.lines().any(
            |l| l.contains("current stack RSP 0x") && l.contains("the word below it at GPA 0x")
        ),
        "{report}"
    );
    // No device wrote anything: the micro-guest has none.
    assert!(
        report.contains("\nlast 0 device writes through the vIOMMU adapter (oldest first):"),
        "{report}"
    );
    // The micro-guest maps only low addresses: no kernel half, so no
    // copies of one to look for.
    assert!(
        path.contains("kernel half: 256 of 256 entries zero"),
        "{report}"
    );
    assert!(
        report.contains(": none looked for, it has no entries\n"),
        "{report}"
    );
    // The exits, the OUT at its RIP among them, the shutdown last.
    let exits = &report[report.find("\nlast ").expect("an exit list")..];
    // KVMs differ in whether the RIP of an OUT's exit is already past it
    // (PVM's is; VMX's and SVM's complete the OUT at the next KVM_RUN).
    assert!(
        [out_rip, ud2_rip].iter().any(|rip| exits
            .contains(&format!("IO RIP {rip:#x} OUT port 0x80 size 1; route: -; "))),
        "{report}"
    );
    assert!(
        exits
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .contains(" SHUTDOWN RIP "),
        "{report}"
    );
}
