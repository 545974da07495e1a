//! The atomic operations conntrack needs. The bpfel target's `core::sync::atomic` offers no
//! compare-and-swap or fetch-and-op (its target spec says "no CAS"), but LLVM lowers the
//! compiler's atomic intrinsics to the BPF v3 atomics the kernel has had since 5.12
//! (BPF_CMPXCHG, BPF_FETCH). Each is one instruction and acts on memory shared with other
//! CPUs (map values).
use core::intrinsics::{atomic_and, atomic_cxchg, atomic_or, atomic_xadd, AtomicOrdering::SeqCst};

/// Compare-and-swap: the value before, and whether the swap happened.
///
/// # Safety
/// `p` is valid and 8-byte aligned (map values are).
#[inline(always)]
pub unsafe fn cas(p: *mut u64, old: u64, new: u64) -> (u64, bool) {
    atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(p, old, new)
}

/// # Safety
/// As [`cas`].
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u64, delta: u64) -> u64 {
    atomic_xadd::<u64, u64, { SeqCst }>(p, delta)
}

/// # Safety
/// `p` is valid and 4-byte aligned.
#[inline(always)]
pub unsafe fn fetch_or(p: *mut u32, bits: u32) -> u32 {
    atomic_or::<u32, u32, { SeqCst }>(p, bits)
}

/// # Safety
/// As [`fetch_or`].
#[inline(always)]
pub unsafe fn fetch_and(p: *mut u32, bits: u32) -> u32 {
    atomic_and::<u32, u32, { SeqCst }>(p, bits)
}

/// A load no compiler will split or cache: one aligned 64-bit BPF load, single-copy atomic.
/// (An atomic-load intrinsic would need BPF v4's load-acquire.)
///
/// # Safety
/// As [`cas`].
#[inline(always)]
pub unsafe fn load(p: *const u64) -> u64 {
    p.read_volatile()
}
