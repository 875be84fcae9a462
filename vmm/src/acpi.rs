//! ACPI tables for the configured machine (RSDP, XSDT, FADT, DSDT, MADT, MCFG, and DMAR when a vIOMMU is present).
