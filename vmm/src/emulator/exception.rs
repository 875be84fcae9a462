//! Exceptions the emulator raises in the guest.

use std::fmt;

use crate::x86::vector;

/// An exception to deliver to the guest, as an emulated instruction would
/// have raised it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exception {
    /// Vector (0-31).
    pub vector: u8,
    /// Error code pushed by the CPU, for the vectors that have one.
    pub error_code: Option<u32>,
    /// Faulting linear address (#PF only): the guest's CR2 when its handler
    /// runs.
    pub cr2: Option<u64>,
}

impl Exception {
    /// #GP(0).
    pub const fn gp0() -> Self {
        Exception {
            vector: vector::GP,
            error_code: Some(0),
            cr2: None,
        }
    }

    /// #SS(0).
    pub const fn ss0() -> Self {
        Exception {
            vector: vector::SS,
            error_code: Some(0),
            cr2: None,
        }
    }

    /// #UD.
    pub const fn ud() -> Self {
        Exception {
            vector: vector::UD,
            error_code: None,
            cr2: None,
        }
    }

    /// #NM.
    pub const fn nm() -> Self {
        Exception {
            vector: vector::NM,
            error_code: None,
            cr2: None,
        }
    }

    /// #DB (raised by INT1 after it completes: trap semantics; it sets no
    /// DR6 bit).
    pub const fn db() -> Self {
        Exception {
            vector: vector::DB,
            error_code: None,
            cr2: None,
        }
    }

    /// #BP (raised by INT3 after it completes: trap semantics).
    pub const fn bp() -> Self {
        Exception {
            vector: vector::BP,
            error_code: None,
            cr2: None,
        }
    }

    /// #PF with the architectural error code and the faulting address.
    pub const fn page_fault(error_code: u32, address: u64) -> Self {
        Exception {
            vector: vector::PF,
            error_code: Some(error_code),
            cr2: Some(address),
        }
    }

    /// #GP(0) or, for an SS-based memory reference, #SS(0): what a
    /// non-canonical address raises (SDM Vol. 3A, 6.15).
    pub const fn non_canonical(ss_based: bool) -> Self {
        Self::address_fault(ss_based)
    }

    /// #GP(0) or, for an SS-based memory reference, #SS(0): what an
    /// address outside its segment's limit or type raises (SDM Vol. 3A,
    /// 5.3, 6.15).
    pub const fn address_fault(ss_based: bool) -> Self {
        if ss_based {
            Self::ss0()
        } else {
            Self::gp0()
        }
    }

    fn mnemonic(&self) -> &'static str {
        const NAMES: [&str; 32] = [
            "#DE",
            "#DB",
            "NMI",
            "#BP",
            "#OF",
            "#BR",
            "#UD",
            "#NM",
            "#DF",
            "vector 9",
            "#TS",
            "#NP",
            "#SS",
            "#GP",
            "#PF",
            "vector 15",
            "#MF",
            "#AC",
            "#MC",
            "#XM",
            "#VE",
            "#CP",
            "vector 22",
            "vector 23",
            "vector 24",
            "vector 25",
            "vector 26",
            "vector 27",
            "#HV",
            "#VC",
            "#SX",
            "vector 31",
        ];
        NAMES
            .get(usize::from(self.vector))
            .copied()
            .unwrap_or("vector")
    }
}

impl fmt::Display for Exception {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mnemonic())?;
        if let Some(code) = self.error_code {
            write!(f, "({code:#x})")?;
        }
        if let Some(cr2) = self.cr2 {
            write!(f, " CR2={cr2:#x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_vector_code_and_cr2() {
        assert_eq!(Exception::gp0().to_string(), "#GP(0x0)");
        assert_eq!(Exception::ud().to_string(), "#UD");
        assert_eq!(
            Exception::page_fault(5, 0x1000).to_string(),
            "#PF(0x5) CR2=0x1000"
        );
        assert_eq!(Exception::non_canonical(true), Exception::ss0());
    }
}
