//! Bit-field helpers shared by the register and descriptor models.

/// Defines getter/setter pairs for bit fields of a newtype around an
/// unsigned integer: `name / set_name : hi, lo;` covers bits `hi..=lo`.
macro_rules! bitfields {
    ($ty:ty; $( $(#[$doc:meta])* $get:ident / $set:ident : $hi:literal, $lo:literal; )*) => {
        $(
            $(#[$doc])*
            #[allow(dead_code)]
            pub fn $get(&self) -> $ty {
                (self.0 >> $lo) & $crate::bits::mask::<$ty>($hi - $lo + 1)
            }

            #[allow(dead_code)]
            #[doc = concat!("Sets the field read by [`Self::", stringify!($get), "`].")]
            pub fn $set(&mut self, value: $ty) -> &mut Self {
                let mask = $crate::bits::mask::<$ty>($hi - $lo + 1) << $lo;
                self.0 = (self.0 & !mask) | ((value << $lo) & mask);
                self
            }
        )*
    };
}
pub(crate) use bitfields;

/// Integers the bit-field helpers work on.
pub trait Word:
    Copy
    + std::ops::Shl<u32, Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::BitAnd<Output = Self>
    + std::ops::BitOr<Output = Self>
    + std::ops::Not<Output = Self>
    + PartialEq
{
    /// The value one.
    const ONE: Self;
    /// The value zero.
    const ZERO: Self;
    /// Width in bits.
    const BITS: u32;
}

impl Word for u32 {
    const ONE: Self = 1;
    const ZERO: Self = 0;
    const BITS: u32 = 32;
}

impl Word for u64 {
    const ONE: Self = 1;
    const ZERO: Self = 0;
    const BITS: u32 = 64;
}

/// A mask of the `width` low bits.
pub fn mask<T: Word>(width: u32) -> T {
    if width >= T::BITS {
        !T::ZERO
    } else {
        (T::ONE << width) - T::ONE
    }
}

/// Reads a little-endian integer of up to eight bytes.
pub fn le_value(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

/// Whether `[a, a+alen)` and `[b, b+blen)` intersect (empty ranges never do).
pub fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    if alen == 0 || blen == 0 {
        return false;
    }
    let a_end = u128::from(a) + u128::from(alen);
    let b_end = u128::from(b) + u128::from(blen);
    u128::from(a) < b_end && u128::from(b) < a_end
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u64);
    impl Reg {
        bitfields! { u64;
            low / set_low: 7, 0;
            top / set_top: 63, 60;
            all / set_all: 63, 0;
        }
    }

    #[test]
    fn fields_round_trip() {
        let mut r = Reg(0);
        r.set_low(0x1ff).set_top(0xa);
        assert_eq!(r.0, 0xa000_0000_0000_00ff);
        assert_eq!((r.low(), r.top()), (0xff, 0xa));
        r.set_all(u64::MAX);
        assert_eq!(r.all(), u64::MAX);
    }

    #[test]
    fn overlap_rules() {
        assert!(overlaps(0, 10, 9, 1));
        assert!(!overlaps(0, 10, 10, 1));
        assert!(!overlaps(5, 0, 0, 10));
        assert!(overlaps(u64::MAX - 1, 2, u64::MAX, 1));
    }
}
