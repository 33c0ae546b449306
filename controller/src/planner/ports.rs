//! MASTER_PORT leases.

use std::collections::HashSet;
use std::ops::RangeInclusive;

/// The first port of `range` not in `used`, going round from `start`, so that a
/// port just released (maybe in TIME_WAIT) is reused last. None when every
/// port of the range is leased.
pub fn next_master_port(range: &RangeInclusive<u16>, start: u16, used: &HashSet<u16>) -> Option<u16> {
    let (lo, hi) = (*range.start(), *range.end());
    if lo > hi {
        return None;
    }
    let span = u32::from(hi - lo) + 1;
    let start = start.clamp(lo, hi);
    (0..span).map(|i| lo + ((u32::from(start - lo) + i) % span) as u16).find(|p| !used.contains(p))
}
