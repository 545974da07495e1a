//! Sweeping expired conntrack entries. The datapath already treats an expired entry as
//! absent (and reclaims its SNAT port); the sweep frees its LRU slot, so live flows are
//! not the ones the LRU evicts under pressure.
use aya::maps::{HashMap, MapData, MapError};
use lb_common::{
    conntrack::{expired, State},
    CtKey, CtValue,
};

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Deletes the entries expired at `now_ns`; returns how many.
pub fn sweep(map: &mut HashMap<MapData, CtKey, CtValue>, now_ns: u64) -> Result<usize, MapError> {
    let stale: Vec<CtKey> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| expired(k.proto, State::from_u8(v.state), v.last_seen_ns, now_ns))
        .map(|(k, _)| k)
        .collect();
    let mut removed = 0;
    for key in &stale {
        match map.remove(key) {
            Ok(()) => removed += 1,
            // Gone meanwhile (evicted, or replaced by the datapath): fine.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}
