//! MSI delivery into KVM for device models.

use std::sync::Arc;

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use pci::{MsiMessage, MsiSink};

/// Delivers device MSIs with KVM_SIGNAL_MSI.
pub struct KvmMsiSink {
    vm: Arc<VmFd>,
}

impl KvmMsiSink {
    /// A sink for the VM `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl MsiSink for KvmMsiSink {
    fn send_msi(&self, msg: MsiMessage) {
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        match self.vm.signal_msi(msi) {
            Ok(0) => log::debug!(
                "MSI {:#x}/{:#x} not delivered: blocked by the guest",
                msg.address,
                msg.data
            ),
            Ok(_) => {}
            Err(e) => log::warn!("KVM_SIGNAL_MSI {:#x}/{:#x}: {e}", msg.address, msg.data),
        }
    }
}
