//! The MADT (signature APIC): local APICs, the IOAPIC and interrupt source
//! overrides.

use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::sdt::Sdt;

use super::{aml_bytes, AcpiConfig, HEADER_LEN, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout;

/// MADT revision (ACPI 6.x).
const MADT_REVISION: u8 = 5;
/// MADT header fields after the standard header.
const LOCAL_APIC_ADDRESS_OFFSET: usize = HEADER_LEN;
const MADT_FLAGS_OFFSET: usize = HEADER_LEN + 4;
/// The header size including local APIC address and flags.
const MADT_HEADER_LEN: u32 = HEADER_LEN as u32 + 8;
/// MADT flags: the machine also has dual 8259s (KVM's in-kernel PIC).
const PCAT_COMPAT: u32 = 1 << 0;
/// IOAPIC ID (KVM's in-kernel IOAPIC resets to ID 0).
const IOAPIC_ID: u8 = 0;

/// MPS INTI flags of interrupt source overrides and NMI sources.
mod inti_flags {
    /// Polarity: active high.
    pub const ACTIVE_HIGH: u16 = 0b01;
    /// Trigger mode: edge.
    pub const EDGE: u16 = 0b01 << 2;
}

/// Interrupt source override (MADT structure type 2).
struct InterruptSourceOverride {
    /// ISA IRQ.
    source: u8,
    /// The GSI it arrives on.
    gsi: u32,
    /// MPS INTI flags.
    flags: u16,
}

impl InterruptSourceOverride {
    const TYPE: u8 = 2;
    const LEN: u8 = 10;
    /// Bus 0 is ISA.
    const BUS_ISA: u8 = 0;

    fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![Self::TYPE, Self::LEN, Self::BUS_ISA, self.source];
        b.extend_from_slice(&self.gsi.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// Local APIC NMI (MADT structure type 4).
struct LocalApicNmi {
    /// ACPI processor UID, 0xff for all processors.
    processor_uid: u8,
    /// MPS INTI flags.
    flags: u16,
    /// LINT pin (0 or 1).
    lint: u8,
}

impl LocalApicNmi {
    const TYPE: u8 = 4;
    const LEN: u8 = 6;
    const ALL_PROCESSORS: u8 = 0xff;

    fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![Self::TYPE, Self::LEN, self.processor_uid];
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.push(self.lint);
        b
    }
}

/// Interrupt source overrides for KVM's in-kernel irqchip: the PIT's IRQ 0
/// arrives on IOAPIC pin 2, as on PC chipsets (the machine routes GSI 2 to
/// pin 2 and the PIT to it, QEMU-style). ISA IRQs 1..15 keep the default
/// identity mapping, edge-triggered and active high, which needs no entry.
const ISA_OVERRIDES: [InterruptSourceOverride; 1] = [InterruptSourceOverride {
    source: 0,
    gsi: 2,
    flags: inti_flags::ACTIVE_HIGH | inti_flags::EDGE,
}];

/// The MADT for `config`.
pub(super) fn build(config: &AcpiConfig) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(LOCAL_APIC_ADDRESS_OFFSET, layout::LAPIC_START as u32);
    madt.write_u32(MADT_FLAGS_OFFSET, PCAT_COMPAT);
    for cpu in 0..config.num_cpus {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(
        IOAPIC_ID,
        layout::IOAPIC_START as u32,
        0,
    )));
    for iso in &ISA_OVERRIDES {
        madt.append_slice(&iso.to_bytes());
    }
    madt.append_slice(
        &LocalApicNmi {
            processor_uid: LocalApicNmi::ALL_PROCESSORS,
            flags: inti_flags::ACTIVE_HIGH | inti_flags::EDGE,
            lint: 1,
        }
        .to_bytes(),
    );
    madt.as_slice().to_vec()
}
