//! Tests: the tables are parsed back from guest memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use acpi_tables::sdt::Sdt;
use bus::BusDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn byte_sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
}

/// Reads the table at `addr`, checking its length field and checksum.
fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    let mut header = [0u8; HEADER_LEN];
    mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
    let len = u32_at(&header, 4) as usize;
    assert!(len >= HEADER_LEN, "table at {addr:#x} has length {len}");
    let mut table = vec![0u8; len];
    mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
    assert_eq!(
        byte_sum(&table),
        0,
        "checksum of {}",
        String::from_utf8_lossy(&table[..4])
    );
    table
}

/// The parsed table tree.
struct Tables {
    rsdp: Vec<u8>,
    xsdt: Vec<u8>,
    /// XSDT entries: (address, table).
    entries: Vec<(u64, Vec<u8>)>,
    dsdt: Vec<u8>,
}

impl Tables {
    fn parse(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Self {
        let mut rsdp = vec![0u8; 36];
        mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(byte_sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(byte_sum(&rsdp), 0, "RSDP extended checksum");
        let xsdt = read_table(mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<(u64, Vec<u8>)> = xsdt[HEADER_LEN..]
            .chunks(8)
            .map(|c| {
                let addr = u64::from_le_bytes(c.try_into().unwrap());
                (addr, read_table(mem, addr))
            })
            .collect();
        let fadt = &entries
            .iter()
            .find(|(_, t)| &t[..4] == b"FACP")
            .expect("FADT in XSDT")
            .1;
        let dsdt = read_table(mem, u64_at(fadt, 140));
        Self {
            rsdp,
            xsdt,
            entries,
            dsdt,
        }
    }

    fn table(&self, signature: &[u8; 4]) -> &[u8] {
        &self
            .entries
            .iter()
            .find(|(_, t)| &t[..4] == signature)
            .unwrap_or_else(|| panic!("{} not in XSDT", String::from_utf8_lossy(signature)))
            .1
    }

    fn signatures(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|(_, t)| String::from_utf8_lossy(&t[..4]).into_owned())
            .collect()
    }
}

fn build(config: &AcpiConfig) -> (GuestMemoryMmap, Tables) {
    let mem = memory();
    let rsdp = create_acpi_tables(&mem, config).unwrap();
    assert_eq!(rsdp, GuestAddress(layout::ACPI_START));
    let tables = Tables::parse(&mem, rsdp);
    (mem, tables)
}

/// A DMAR as the vIOMMU builds it: one DRHD with INCLUDE_PCI_ALL.
fn fake_dmar() -> Vec<u8> {
    let mut dmar = Sdt::new(*b"DMAR", 48, 1, *b"VTDDSA", *b"VIOMMU  ", 1);
    dmar.write_u8(36, 46); // host address width - 1
    let mut drhd = vec![0u8, 0, 16, 0, 1, 0, 0, 0];
    drhd.extend_from_slice(&layout::VIOMMU_START.to_le_bytes());
    dmar.append_slice(&drhd);
    dmar.as_slice().to_vec()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn pointer_chain_rsdp_xsdt_fadt_dsdt() {
    let (_mem, t) = build(&AcpiConfig::new(2));
    assert_eq!(t.rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&t.rsdp, 20), 36, "RSDP length");
    assert_eq!(&t.rsdp[9..15], b"VTDDSA");
    assert_eq!(t.xsdt[8], 1, "XSDT revision");
    assert_eq!(t.signatures(), ["FACP", "APIC", "MCFG"]);
    assert_eq!(&t.dsdt[..4], b"DSDT");
    assert_eq!(t.dsdt[8], 2, "DSDT revision: 64-bit integers");
    for (addr, _) in &t.entries {
        assert!(
            (layout::ACPI_START..layout::ACPI_END).contains(addr),
            "{addr:#x}"
        );
        assert_eq!(addr % 8, 0);
    }
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_registers() {
    let (_mem, t) = build(&AcpiConfig::new(1));
    let fadt = t.table(b"FACP");
    assert_eq!(fadt.len(), 276);
    assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT pointer unused");
    assert_eq!(u32_at(fadt, 112) & (1 << 20), 1 << 20, "HW_REDUCED_ACPI");
    assert_eq!(
        u16_at(fadt, 109),
        (1 << 2) | (1 << 5),
        "no VGA, no CMOS RTC"
    );
    assert_eq!(u32_at(fadt, 56), 0, "no PM1a event block");
    assert_eq!(u32_at(fadt, 64), 0, "no PM1a control block");
    // GAS: space 1 (I/O), 8 bits, offset 0, byte access, address.
    assert_eq!(fadt[244..248], [1, 8, 0, 1]);
    assert_eq!(
        u64_at(fadt, 248),
        u64::from(layout::ACPI_SLEEP_CONTROL_PORT)
    );
    assert_eq!(fadt[256..260], [1, 8, 0, 1]);
    assert_eq!(u64_at(fadt, 260), u64::from(layout::ACPI_SLEEP_STATUS_PORT));
}

/// MADT structures as (type, bytes).
fn madt_structures(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let len = usize::from(madt[at + 1]);
        assert!(len >= 2, "structure at {at} has length {len}");
        out.push((madt[at], madt[at..at + len].to_vec()));
        at += len;
    }
    assert_eq!(at, madt.len(), "structures fill the table exactly");
    out
}

#[test]
fn madt_lists_each_vcpu_the_ioapic_and_overrides() {
    for cpus in [1u8, 2, 8, 255] {
        let (_mem, t) = build(&AcpiConfig::new(cpus));
        let madt = t.table(b"APIC");
        assert_eq!(u32_at(madt, 36), layout::LAPIC_START as u32);
        assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
        let structures = madt_structures(madt);
        let lapics: Vec<_> = structures.iter().filter(|(k, _)| *k == 0).collect();
        assert_eq!(lapics.len(), usize::from(cpus));
        for (i, (_, s)) in lapics.iter().enumerate() {
            assert_eq!(s[2..4], [i as u8, i as u8], "UID and APIC ID");
            assert_eq!(u32_at(s, 4), 1, "enabled");
        }
        let ioapics: Vec<_> = structures.iter().filter(|(k, _)| *k == 1).collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(u32_at(&ioapics[0].1, 4), layout::IOAPIC_START as u32);
        assert_eq!(u32_at(&ioapics[0].1, 8), 0, "GSI base");
        let overrides: Vec<_> = structures.iter().filter(|(k, _)| *k == 2).collect();
        assert_eq!(overrides.len(), 1);
        assert_eq!(overrides[0].1, [2, 10, 0, 0, 2, 0, 0, 0, 0x05, 0]);
        let nmis: Vec<_> = structures.iter().filter(|(k, _)| *k == 4).collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!(nmis[0].1, [4, 6, 0xff, 0x05, 0, 1]);
        assert_eq!(structures.len(), usize::from(cpus) + 3);
    }
}

#[test]
fn mcfg_describes_ecam_of_bus_0() {
    let (_mem, t) = build(&AcpiConfig::new(1));
    let mcfg = t.table(b"MCFG");
    assert_eq!(mcfg.len(), 44 + 16);
    assert_eq!(u64_at(mcfg, 44), layout::PCIE_ECAM_START);
    assert_eq!(u16_at(mcfg, 52), 0, "segment");
    assert_eq!(mcfg[54..56], [0, 0], "buses 0..=0");
}

#[test]
fn extra_table_is_listed_verbatim() {
    let dmar = fake_dmar();
    let mut config = AcpiConfig::new(2);
    config.extra_tables.push(dmar.clone());
    let (_mem, t) = build(&config);
    assert_eq!(t.signatures(), ["FACP", "APIC", "MCFG", "DMAR"]);
    assert_eq!(t.table(b"DMAR"), &dmar[..]);
}

#[test]
fn dsdt_names_s5_host_bridge_serial_and_reserved_ecam() {
    let (_mem, t) = build(&AcpiConfig::new(1));
    let aml = &t.dsdt[HEADER_LEN..];
    // Name(_S5_, Package(4) {5, 5, 0, 0})
    assert!(contains(
        aml,
        &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0, 0]
    ));
    // EISAID("PNP0A08"), EISAID("PNP0A03"), EISAID("PNP0501"), EISAID("PNP0C02")
    for id in [
        [0x41, 0xd0, 0x0a, 0x08],
        [0x41, 0xd0, 0x0a, 0x03],
        [0x41, 0xd0, 0x05, 0x01],
        [0x41, 0xd0, 0x0c, 0x02],
    ] {
        assert!(contains(aml, &[&[0x0c][..], &id].concat()), "{id:02x?}");
    }
    for name in [
        b"PCI0", b"COM1", b"MRES", b"_SEG", b"_BBN", b"_UID", b"_CRS",
    ] {
        assert!(contains(aml, name), "{}", String::from_utf8_lossy(name));
    }
    // WordBusNumber 0..0.
    assert!(contains(
        aml,
        &[0x88, 0x0d, 0, 0x02, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    ));
    // IO(Decode16, 0xCF8, 0xCF8, 1, 8) and COM1's IO(0x3F8, 0x3F8, 1, 8).
    assert!(contains(aml, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
    assert!(contains(aml, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]));
    // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {4}
    assert!(contains(aml, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));
    // DWordMemory window: min 0xC0000000, max 0xDFFFFFFF.
    assert!(contains(
        aml,
        &[0x00, 0x00, 0x00, 0xc0, 0xff, 0xff, 0xff, 0xdf]
    ));
    // QWordMemory window min.
    assert!(contains(aml, &layout::PCI_MMIO64_START.to_le_bytes()));
    // Memory32Fixed(ReadWrite, ECAM base, 1 MiB).
    assert!(contains(
        aml,
        &[0x86, 9, 0, 1, 0, 0, 0, 0xe0, 0, 0, 0x10, 0]
    ));
    // IO(Decode16, 0x600, 0x600, 1, 2): the sleep registers.
    assert!(contains(aml, &[0x47, 1, 0x00, 0x06, 0x00, 0x06, 1, 2]));
}

#[test]
fn bad_configurations_are_refused_with_a_reason() {
    let mem = memory();
    let err = create_acpi_tables(&mem, &AcpiConfig::new(0)).unwrap_err();
    assert_eq!(err.to_string(), "ACPI tables need at least one vCPU");

    let mut config = AcpiConfig::new(1);
    let mut bad_sum = fake_dmar();
    bad_sum[40] ^= 1;
    config.extra_tables = vec![fake_dmar(), bad_sum];
    assert_eq!(
        create_acpi_tables(&mem, &config).unwrap_err().to_string(),
        format!(
            "extra ACPI table 1 is malformed: checksum byte {:#04x} does not make the bytes sum to zero",
            fake_dmar()[9]
        )
    );

    let mut truncated = fake_dmar();
    truncated.pop();
    config.extra_tables = vec![truncated];
    assert_eq!(
        create_acpi_tables(&mem, &config).unwrap_err().to_string(),
        "extra ACPI table 0 is malformed: length field 64 but 63 bytes given"
    );

    config.extra_tables = vec![b"DMAR".to_vec()];
    assert_eq!(
        create_acpi_tables(&mem, &config).unwrap_err().to_string(),
        "extra ACPI table 0 is malformed: 4 bytes, shorter than a table header"
    );

    let mut huge = Sdt::new(*b"SSDT", 0x20000, 2, OEM_ID, OEM_TABLE_ID, 1);
    huge.update_checksum();
    config.extra_tables = vec![huge.as_slice().to_vec()];
    let err = create_acpi_tables(&mem, &config).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("more than the 0x20000 reserved at 0xe0000"),
        "{err}"
    );
    let mut untouched = [0u8; 8];
    mem.read_slice(&mut untouched, GuestAddress(layout::ACPI_START))
        .unwrap();
    assert_eq!(untouched, [0; 8], "nothing written on error");
}

#[test]
fn memory_without_the_acpi_area_is_an_error() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 1 << 20)]).unwrap();
    let err = create_acpi_tables(&mem, &AcpiConfig::new(1)).unwrap_err();
    assert!(matches!(err, AcpiError::GuestMemory(_)), "{err}");
}

#[test]
fn sleep_device_reports_s5_only() {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let mut dev = AcpiSleepDevice::new(move || {
        seen.fetch_add(1, Ordering::SeqCst);
    });
    let port = u64::from(layout::ACPI_SLEEP_CONTROL_PORT);
    let s5 = (SLEEP_TYPE_S5 << 2) | SLEEP_CONTROL_SLP_EN;
    assert_eq!(s5, 0x34, "what Linux writes for S5");

    dev.write(port, 0, &[SLEEP_TYPE_S5 << 2]);
    assert_eq!(count.load(Ordering::SeqCst), 0, "SLP_EN clear");
    dev.write(port, 0, &[(3 << 2) | SLEEP_CONTROL_SLP_EN]);
    assert_eq!(count.load(Ordering::SeqCst), 0, "S3 is not offered");
    dev.write(port, 1, &[0x80]);
    dev.write(port, 0, &[s5, 0]);
    assert_eq!(count.load(Ordering::SeqCst), 0, "status and wide writes");

    dev.write(port, 0, &[s5]);
    assert_eq!(count.load(Ordering::SeqCst), 1);

    let mut status = [0xff];
    dev.read(port, 1, &mut status);
    assert_eq!(status, [0]);
}

/// Manual check (see the module docs): ACPICA's disassembler accepts every
/// table without errors or warnings.
#[test]
#[ignore = "manual check: needs iasl from Debian's acpica-tools"]
fn iasl_disassembles_every_table() {
    let mut config = AcpiConfig::new(2);
    config.extra_tables.push(fake_dmar());
    let (_mem, t) = build(&config);
    let dir = std::env::temp_dir().join(format!("vmm-acpi-iasl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut tables: Vec<&[u8]> = t.entries.iter().map(|(_, b)| &b[..]).collect();
    tables.push(&t.dsdt);
    tables.push(&t.xsdt);
    for table in tables {
        let name = String::from_utf8_lossy(&table[..4]).to_lowercase();
        let path = dir.join(format!("{name}.dat"));
        std::fs::write(&path, table).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .output()
            .expect("iasl runs (apt-get install acpica-tools)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl -d {name}: {text}");
        for bad in ["Error", "Warning"] {
            assert!(!text.contains(bad), "iasl -d {name}: {text}");
        }
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
        println!("{dsl}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
