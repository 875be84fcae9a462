//! The PCIe root complex: ECAM and 0xCF8/0xCFC configuration access, BAR assignment, MMIO dispatch.
