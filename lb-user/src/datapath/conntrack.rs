//! Conntrack from the agent's side: reading the table, and removing entries through the
//! kernel's reaper program (never by deleting keys from here: only a compare-and-swap of
//! an entry's stamp may free it, see lb_common::conntrack). The sweep frees the room of
//! flows that are over; the datapath already treats them as gone.
use std::{
    hash::{BuildHasher, RandomState},
    mem::size_of,
    path::Path,
    time::Instant,
};

use aya::{
    maps::{Array, IterableMap, MapData},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    conntrack::{alive, nonce, units},
    ct_flags, map_names, program_names, reap_mode,
    user::addr_be,
    Backend, CtKey, CtState, CtValue, ServiceKey, ServiceValue, IPPROTO_UDP, REAP_BATCH,
};

use super::{batch, open_map, Error, Result};

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of bpf_ktime_get_coarse_ns.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The conntrack table and its reaper, opened from the pins (works while the agent is down).
pub struct Conntrack {
    table: aya::maps::HashMap<MapData, CtKey, CtValue>,
    services: aya::maps::HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, Backend>,
    state: Array<MapData, CtState>,
    queue: Array<MapData, CtKey>,
    reaper: Xdp,
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Entries read.
    pub entries: usize,
    /// Entries found dead (expired, or without their peer) and handed to the reaper.
    pub candidates: usize,
    /// Flows the reaper removed (each with both halves where both were there).
    pub removed: usize,
    pub read_ms: u128,
    pub reap_ms: u128,
    /// The most memory it held to find the dead, in bytes: 24 per live half (a copy of the
    /// table and a map of its keys took 120).
    pub held_bytes: usize,
}

fn typed<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(pin_dir: &Path, name: &'static str) -> Result<T> {
    T::try_from(open_map(pin_dir, name)?).map_err(|source| Error::Map { name, source })
}

impl Conntrack {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let name = program_names::CT_REAP;
        let path = pin_dir.join("progs").join(name);
        let reaper = Xdp::from_pin(&path, aya_obj::programs::XdpAttachType::Interface)
            .map_err(|source| Error::Program { name, source })?;
        Ok(Conntrack {
            table: typed(pin_dir, map_names::CONNTRACK)?,
            services: typed(pin_dir, map_names::SERVICES)?,
            backends: typed(pin_dir, map_names::BACKENDS)?,
            state: typed(pin_dir, map_names::CT_STATE)?,
            queue: typed(pin_dir, map_names::REAP_QUEUE)?,
            reaper,
        })
    }

    /// Every entry (both halves of every flow).
    pub fn entries(&self) -> Result<Vec<(CtKey, CtValue)>> {
        let name = map_names::CONNTRACK;
        batch::read_all(IterableMap::map(&self.table)).map_err(|source| Error::Io { path: name.into(), source })
    }

    /// Hands every entry to `visit`, without copying the table.
    fn each(&self, visit: impl FnMut(&CtKey, &CtValue)) -> Result<()> {
        let name = map_names::CONNTRACK;
        batch::for_each(IterableMap::map(&self.table), visit).map_err(|source| Error::Io { path: name.into(), source })
    }

    /// Entries as the datapath counts them (its admission control reads the same number).
    pub fn counted_entries(&self) -> Result<u64> {
        let name = map_names::CT_STATE;
        Ok(self.state.get(&0, 0).map_err(|source| Error::Map { name, source })?.entries)
    }

    /// Removes the flows that are over: expired, or a half whose peer is gone.
    pub fn sweep(&mut self) -> Result<Sweep> {
        let started = Instant::now();
        let now = units(coarse_now_ns());
        let counted = self.counted_entries()? as usize;
        // Live halves by their flow's fingerprint: 24 bytes each, what finding a half
        // without its peer needs, instead of a copy of the table.
        let mut live: Vec<(u64, CtKey)> = Vec::new();
        live.reserve_exact(counted + counted / 16);
        let mut dead: Vec<CtKey> = Vec::new();
        let mut entries = 0;
        let hasher = RandomState::new();
        self.each(|k, v| {
            entries += 1;
            if alive(k.proto, v.state, v.stamp, now) {
                live.push((flow_fingerprint(k, &peer_of(k, v), nonce(v.stamp), &hasher), *k));
            } else {
                dead.push(*k);
            }
        })?;
        let read_ms = started.elapsed().as_millis();
        // A flow's two halves share a fingerprint. Any other count is a half without its
        // peer (or one read while its peer was being added, or a rare collision: the reaper
        // checks each again and keeps what is whole).
        live.sort_unstable_by_key(|(fingerprint, _)| *fingerprint);
        for flow in live.chunk_by(|a, b| a.0 == b.0).filter(|halves| halves.len() != 2) {
            dead.extend(flow.iter().map(|(_, k)| *k));
        }
        let held_bytes = live.capacity() * size_of::<(u64, CtKey)>() + dead.capacity() * size_of::<CtKey>();
        drop(live);
        let started = Instant::now();
        let removed = self.reap(&dead, reap_mode::DEAD)?;
        Ok(Sweep {
            entries,
            candidates: dead.len(),
            removed,
            read_ms,
            reap_ms: started.elapsed().as_millis(),
            held_bytes,
        })
    }

    /// Removes the UDP flows through each frontend to its backend (address and port) that
    /// the maps still hold: an endpoint that stopped serving but stays in the slices keeps
    /// its id, and so its flows, which kube-proxy's conntrack cleanup would delete so the
    /// client's next datagram chooses again. Read from the maps as they are now: call it
    /// after the change is written. Returns the flows removed.
    pub fn forget_udp_flows(&mut self, to: &[(ServiceKey, std::net::SocketAddrV4)]) -> Result<usize> {
        let mut wanted = std::collections::HashSet::new();
        for (frontend, backend) in to {
            if let Ok(svc) = self.services.get(frontend, 0) {
                wanted.insert((svc.svc_id, addr_be(*backend.ip()), backend.port().to_be()));
            }
        }
        if wanted.is_empty() {
            return Ok(0);
        }
        let backend_of = |v: &CtValue| {
            let b = self.backends.get(&v.backend_id, 0).ok().filter(|b| b.gen == v.backend_gen)?;
            Some((v.svc_id, b.addr_be, b.port_be))
        };
        let mut doomed: Vec<CtKey> = Vec::new();
        self.each(|k, v| {
            let forward_udp = k.proto == IPPROTO_UDP && v.flags & ct_flags::REPLY == 0;
            if forward_udp && backend_of(v).is_some_and(|flow| wanted.contains(&flow)) {
                doomed.push(*k);
            }
        })?;
        self.remove(&doomed)
    }

    /// Removes these flows whatever their state (both halves of each).
    pub fn remove(&mut self, keys: &[CtKey]) -> Result<usize> {
        self.reap(keys, reap_mode::ALL)
    }

    fn reap(&mut self, keys: &[CtKey], mode: u32) -> Result<usize> {
        let mut removed = 0;
        for chunk in keys.chunks(REAP_BATCH as usize) {
            let name = map_names::REAP_QUEUE;
            for (i, key) in chunk.iter().enumerate() {
                self.queue.set(i as u32, key, 0).map_err(|source| Error::Map { name, source })?;
            }
            let mut frame = [0u8; 16];
            frame[8..12].copy_from_slice(&(chunk.len() as u32).to_ne_bytes());
            frame[12..16].copy_from_slice(&mode.to_ne_bytes());
            let mut out = [0u8; 16];
            let program_err = |source: ProgramError| Error::Program { name: program_names::CT_REAP, source };
            self.reaper
                .test_run(TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..TestRunOptions::new() })
                .map_err(program_err)?;
            removed += u32::from_ne_bytes([out[12], out[13], out[14], out[15]]) as usize;
        }
        Ok(removed)
    }
}

/// A flow as either of its halves names it: both keys (in a fixed order) and their nonce.
fn flow_fingerprint(key: &CtKey, peer: &CtKey, nonce: u32, hasher: &RandomState) -> u64 {
    let (a, b) = (bytemuck::bytes_of(key), bytemuck::bytes_of(peer));
    hasher.hash_one((a.min(b), a.max(b), nonce))
}

/// The key of a half's peer (the packets answering its rewrite), as the datapath computes it.
pub fn peer_of(key: &CtKey, v: &CtValue) -> CtKey {
    CtKey {
        src_addr_be: v.nat_dst_addr_be,
        dst_addr_be: v.nat_src_addr_be,
        src_port_be: v.nat_dst_port_be,
        dst_port_be: v.nat_src_port_be,
        proto: key.proto,
        _pad: [0; 3],
    }
}
