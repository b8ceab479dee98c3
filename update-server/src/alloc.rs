//! First-fit page allocator over the patch region.

/// Allocation granule.
pub const PAGE: u64 = 4096;

/// Hands out page-aligned, page-rounded chunks of the patch region, first fit.
#[derive(Debug, Clone)]
pub struct RegionAllocator {
    base: u64,
    size: u64,
    /// Allocated [start, end), sorted.
    used: Vec<(u64, u64)>,
}

impl RegionAllocator {
    /// An allocator over `[base, base + size)`, all free.
    pub fn new(base: u64, size: u64) -> Self {
        Self {
            base,
            size,
            used: Vec::new(),
        }
    }

    /// Allocates `len` bytes (rounded up to pages); returns the address, or None if no
    /// free chunk is that large.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = len.max(1).div_ceil(PAGE).checked_mul(PAGE)?;
        let mut cur = self.base;
        let mut at = self.used.len();
        for (i, &(s, e)) in self.used.iter().enumerate() {
            if s - cur >= len {
                at = i;
                break;
            }
            cur = e;
        }
        if at == self.used.len() && self.size - (cur - self.base) < len {
            return None;
        }
        self.used.insert(at, (cur, cur + len));
        Some(cur)
    }

    /// Frees the chunk that starts at `addr` (one returned by [`alloc`](Self::alloc));
    /// other addresses are ignored.
    pub fn free(&mut self, addr: u64) {
        self.used.retain(|&(s, _)| s != addr);
    }

    /// Bytes not allocated, in total (they need not be contiguous).
    pub fn free_bytes(&self) -> u64 {
        self.size - self.used.iter().map(|(s, e)| e - s).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_and_reuse() {
        let mut a = RegionAllocator::new(0x10000, 4 * PAGE);
        let x = a.alloc(100).unwrap();
        let y = a.alloc(PAGE + 1).unwrap();
        assert_eq!((x, y), (0x10000, 0x11000));
        assert_eq!(a.alloc(2 * PAGE), None);
        let z = a.alloc(PAGE).unwrap();
        assert_eq!(z, 0x13000);
        a.free(x);
        assert_eq!(a.alloc(10).unwrap(), 0x10000);
        a.free(y);
        assert_eq!(a.free_bytes(), 2 * PAGE);
        assert_eq!(a.alloc(2 * PAGE).unwrap(), 0x11000);
    }

    #[test]
    fn huge_requests_fail_instead_of_wrapping() {
        let mut a = RegionAllocator::new(0xffff_ffff_ff00_0000, 16 * PAGE);
        assert_eq!(a.alloc(u64::MAX), None);
        assert_eq!(a.alloc(u64::MAX - PAGE), None);
        assert_eq!(a.alloc(17 * PAGE), None);
        assert_eq!(a.alloc(16 * PAGE), Some(0xffff_ffff_ff00_0000));
    }
}
