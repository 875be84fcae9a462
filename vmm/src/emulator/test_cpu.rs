//! What the emulator's test vCPUs share.

/// The register and memory accessors of [`super::GuestCpu`] for a test
/// vCPU that keeps its registers in fields `regs` (`kvm_regs`) and `sregs`
/// (`kvm_sregs`) and its guest memory in `mem`; used inside the mock's
/// `impl GuestCpu`.
macro_rules! register_and_memory_accessors {
    () => {
        fn regs(&mut self) -> Result<::kvm_bindings::kvm_regs, $crate::emulator::EmulatorError> {
            Ok(self.regs)
        }
        fn set_regs(
            &mut self,
            regs: &::kvm_bindings::kvm_regs,
        ) -> Result<(), $crate::emulator::EmulatorError> {
            self.regs = *regs;
            Ok(())
        }
        fn sregs(&mut self) -> Result<::kvm_bindings::kvm_sregs, $crate::emulator::EmulatorError> {
            Ok(self.sregs)
        }
        fn set_sregs(
            &mut self,
            sregs: &::kvm_bindings::kvm_sregs,
        ) -> Result<(), $crate::emulator::EmulatorError> {
            self.sregs = *sregs;
            Ok(())
        }
        fn memory(&self) -> &::vm_memory::GuestMemoryMmap {
            &self.mem
        }
    };
}

pub(crate) use register_and_memory_accessors;
