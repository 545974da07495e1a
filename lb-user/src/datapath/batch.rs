//! Reading a whole map with BPF_MAP_LOOKUP_BATCH: thousands of entries per system call,
//! where aya's iterators make two calls per entry (1M conntrack entries: a few hundred
//! milliseconds instead of seconds). aya 0.14 has no batch operations; this is the one
//! system call, with the kernel's own `bpf_attr` layout for it.
use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
};

use aya::{maps::MapData, Pod};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call: above a hash map's largest bucket (ENOSPC otherwise).
const PER_CALL: usize = 8192;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of the map. Entries the datapath adds or removes meanwhile may or may
/// not be in the result; none is returned twice.
pub fn read_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for_each(map, |k: &K, v: &V| out.push((*k, *v)))?;
    Ok(out)
}

/// Hands every (key, value) of the map to `visit`, a call's worth at a time: what a whole
/// copy would hold (80 MB for a million conntrack entries) is never held at once. Entries the
/// datapath adds or removes meanwhile may or may not be visited; none is visited twice.
pub fn for_each<K: Pod, V: Pod>(map: &MapData, mut visit: impl FnMut(&K, &V)) -> io::Result<()> {
    for_each_raw::<K>(map, size_of::<V>(), |k, value| {
        // SAFETY: `value` holds one whole V; Pod types accept any bytes.
        let v = unsafe { (value.as_ptr() as *const V).read_unaligned() };
        visit(k, &v)
    })
}

/// The same for a per-CPU map: each key with its value on every possible CPU (`cpus` of
/// them, aya::util::nr_cpus), one system call per few thousand keys instead of one per key.
pub fn for_each_per_cpu<K: Pod, V: Pod>(map: &MapData, cpus: usize, mut visit: impl FnMut(&K, &[V])) -> io::Result<()> {
    // The kernel lays a per-CPU value out at 8-byte steps.
    let step = size_of::<V>().next_multiple_of(8);
    let mut per_cpu: Vec<V> = Vec::with_capacity(cpus);
    for_each_raw::<K>(map, step * cpus, |k, values| {
        per_cpu.clear();
        // SAFETY: `values` holds `cpus` values `step` bytes apart; Pod types accept any bytes.
        per_cpu.extend((0..cpus).map(|c| unsafe { (values.as_ptr().add(c * step) as *const V).read_unaligned() }));
        visit(k, &per_cpu)
    })
}

/// BPF_MAP_LOOKUP_BATCH over the map, values of `value_len` bytes each.
fn for_each_raw<K: Pod>(map: &MapData, value_len: usize, mut visit: impl FnMut(&K, &[u8])) -> io::Result<()> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut keys = vec![0u8; PER_CALL * size_of::<K>()];
    let mut values = vec![0u8; PER_CALL * value_len];
    // Batch tokens: a bucket index for hash maps, a key for arrays; room for either.
    let token_len = size_of::<K>().max(size_of::<u64>());
    let (mut token_in, mut token_out) = (vec![0u8; token_len], vec![0u8; token_len]);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: PER_CALL as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the attr points at buffers of the sizes it states, alive for the call.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        if let Some(e) = &err {
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(io::Error::new(e.kind(), format!("BPF_MAP_LOOKUP_BATCH: {e}")));
            }
        }
        for i in 0..attr.count as usize {
            // SAFETY: the kernel filled `count` whole keys; Pod types accept any bytes.
            let k = unsafe { (keys.as_ptr().add(i * size_of::<K>()) as *const K).read_unaligned() };
            visit(&k, &values[i * value_len..(i + 1) * value_len]);
        }
        if err.is_some() {
            return Ok(());
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}
