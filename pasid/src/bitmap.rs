//! Fixed-size bitmap and the next-fit search the host PASID space uses.

/// A fixed number of bits, packed 64 to a word.
pub(crate) struct Bitmap {
    words: Box<[u64]>,
}

impl Bitmap {
    /// A bitmap of `words` 64-bit words, all clear.
    pub(crate) fn with_words(words: usize) -> Self {
        // `vec![0; n]` asks the allocator for zeroed memory, so large maps
        // cost pages only as they get touched.
        Bitmap {
            words: vec![0; words].into_boxed_slice(),
        }
    }

    #[inline]
    pub(crate) fn word(&self, index: usize) -> u64 {
        self.words[index]
    }

    #[inline]
    pub(crate) fn get(&self, bit: u32) -> bool {
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    #[inline]
    pub(crate) fn set(&mut self, bit: u32) {
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
    }

    #[inline]
    pub(crate) fn clear(&mut self, bit: u32) {
        self.words[(bit / 64) as usize] &= !(1 << (bit % 64));
    }
}

/// Next-fit search: the first bit at or after `hint` (wrapping round once)
/// that is clear in the word returned by `busy(word_index)`. `words` is the
/// number of words to search.
#[inline]
pub(crate) fn find_clear(words: usize, hint: u32, busy: impl Fn(usize) -> u64) -> Option<u32> {
    let first = (hint / 64) as usize % words;
    let free = !busy(first) & (u64::MAX << (hint % 64));
    if free != 0 {
        return Some(first as u32 * 64 + free.trailing_zeros());
    }
    // The last step comes back to `first` whole, for the bits below the hint.
    (1..=words).find_map(|step| {
        let index = (first + step) % words;
        let free = !busy(index);
        (free != 0).then(|| index as u32 * 64 + free.trailing_zeros())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_clear() {
        let mut map = Bitmap::with_words(2);
        for bit in [0, 5, 63, 64, 127] {
            map.set(bit);
        }
        assert!(map.get(63) && map.get(64) && !map.get(1));
        map.clear(5);
        assert!(!map.get(5) && map.get(0));
        assert_eq!((map.word(0), map.word(1)), (1 | 1 << 63, 1 | 1 << 63));
    }

    #[test]
    fn search_starts_at_hint_and_wraps() {
        let mut map = Bitmap::with_words(2);
        map.set(0);
        let busy = |map: &Bitmap, hint| find_clear(2, hint, |w| map.word(w));
        assert_eq!(busy(&map, 0), Some(1));
        assert_eq!(busy(&map, 70), Some(70));
        for bit in 1..128 {
            map.set(bit);
        }
        map.clear(3);
        // From past the end of the map it wraps to the low bits.
        assert_eq!(busy(&map, 100), Some(3));
        assert_eq!(busy(&map, 3), Some(3));
        map.set(3);
        assert_eq!(busy(&map, 40), None);
    }
}
