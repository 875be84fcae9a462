//! The hardware-reduced ACPI sleep registers: how the guest powers off.

use bus::BusDevice;
use log::{info, warn};

/// Sleep control register: SLP_TYP in bits 4:2.
const SLEEP_CONTROL_SLP_TYP_SHIFT: u8 = 2;
const SLEEP_CONTROL_SLP_TYP_MASK: u8 = 0b111 << SLEEP_CONTROL_SLP_TYP_SHIFT;
/// Sleep control register: SLP_EN, "enter the sleep state now".
pub const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
/// The SLP_TYP value the DSDT's \_S5 package announces for soft-off.
pub const SLEEP_TYPE_S5: u8 = 5;

/// Register offsets inside the device's two ports.
const SLEEP_CONTROL_OFFSET: u64 = 0;
const SLEEP_STATUS_OFFSET: u64 = 1;

/// The sleep control and status registers. Register it on the port-I/O bus
/// at `layout::ACPI_SLEEP_CONTROL_PORT` with length
/// [`AcpiSleepDevice::PORT_COUNT`] (the status register is the next port).
///
/// A write of SLP_EN with SLP_TYP = S5 to the control register calls the
/// power-off callback (the machine then stops its vCPUs and exits cleanly).
/// Other sleep types are not offered in the DSDT and are ignored. Both
/// registers read 0: the machine never wakes from a sleep state.
pub struct AcpiSleepDevice {
    on_power_off: Box<dyn Fn() + Send>,
}

impl AcpiSleepDevice {
    /// Number of ports the device decodes (control, then status).
    pub const PORT_COUNT: u64 = 2;

    /// A device that calls `on_power_off` each time the guest enters S5.
    pub fn new(on_power_off: impl Fn() + Send + 'static) -> Self {
        Self {
            on_power_off: Box::new(on_power_off),
        }
    }
}

impl AcpiSleepDevice {
    fn sleep_control_write(&self, value: u8) {
        if value & SLEEP_CONTROL_SLP_EN == 0 {
            return;
        }
        let sleep_type = (value & SLEEP_CONTROL_SLP_TYP_MASK) >> SLEEP_CONTROL_SLP_TYP_SHIFT;
        if sleep_type == SLEEP_TYPE_S5 {
            info!("acpi: guest entered S5 (power off)");
            (self.on_power_off)();
        } else {
            warn!("acpi: guest asked for unsupported sleep type {sleep_type}, ignored");
        }
    }
}

impl BusDevice for AcpiSleepDevice {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data) {
            (SLEEP_CONTROL_OFFSET, &[value]) => self.sleep_control_write(value),
            // WAK_STS is write-1-to-clear and never set.
            (SLEEP_STATUS_OFFSET, &[_]) => {}
            _ => warn!(
                "acpi: ignored {}-byte write at sleep register +{offset}",
                data.len()
            ),
        }
    }
}
