//! The per-packet benchmark's tools: timed BPF_PROG_TEST_RUN calls behind the restoring
//! wrapper (lb-ebpf's bench.rs) that also read back what the runs did (the datapath's own
//! counters, its conntrack accounting, the last frame out), and ways to fill a fixture's
//! maps to scale in the layouts the datapath and the reconciler write: flows straight into
//! conntrack, Services straight into the service maps.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{ensure, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, ProgramArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    checksum::{self, checksum},
    conntrack::{bits, phase, stamp, units, Phase},
    ct_flags, front_filter_bit, map_names, program_names,
    user::{addr_be, ip_from_be},
    Backend, BenchFrame, CtKey, CtState, CtValue, ServiceKey, ServiceValue, SlotKey, XdpMeta, BENCH_FRAME_LEN,
    IPPROTO_TCP,
};
use lb_user::datapath::{
    self,
    conntrack::{coarse_now_ns, peer_of},
    maps::{MapStore, PinnedMaps},
};

use crate::{
    fixture::{ct_key, is_local_pod, split_meta, Fixture, XDP_PASS, XDP_TX},
    packet::{Frame, ACK, SYN},
};

/// What a timed call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// The empty XDP program, without the wrapper.
    Empty,
    /// The wrapper, tail-calling this program of the fixture.
    Wrapped(&'static str),
}

/// One BPF_PROG_TEST_RUN call.
pub struct Call<'a> {
    pub program: Program,
    /// The frame every run starts from (BENCH_FRAME_LEN bytes).
    pub frame: &'a [u8],
    /// Some(n): the wrapper gives every run a source of its own, the first run the source of
    /// the wrapper's run n (see [`wrapper_source`]).
    pub new_flows_from: Option<u32>,
    pub repeat: u32,
}

/// What a call measured and what its runs did.
pub struct Outcome {
    /// The kernel's time per run (its total over the runs divided by their number, in whole ns).
    pub ns_per_run: u64,
    /// The last run's verdict, frame and hand-over metadata.
    pub action: u32,
    pub out: Vec<u8>,
    pub meta: Option<XdpMeta>,
    /// Counters that moved, by label, and by how much.
    pub counters: BTreeMap<&'static str, u64>,
    /// Change of the conntrack entries the datapath counts (LB_CT_STATE).
    pub ct_entries: i64,
    /// The wrapper's run counter after the call.
    pub runs: u32,
}

/// The benchmark side of one fixture: its wrapper, the wrapper's maps, conntrack accounting.
pub struct Bench {
    targets: ProgramArray<MapData>,
    template: Array<MapData, BenchFrame>,
    ct_state: Array<MapData, CtState>,
    /// struct xdp_md of every run: the frame's length and eth0 as the receiving interface.
    ctx: [u8; 24],
}

impl Bench {
    /// Loads the wrapper and the empty program next to the fixture's datapath.
    pub fn new(fx: &mut Fixture) -> Result<Bench> {
        let ebpf = fx.dp.ebpf_mut();
        for name in [program_names::XDP_PASS, program_names::BENCH_RESTORE] {
            let p: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        // Held for the whole benchmark: a program array loses its entries when the last
        // user-space reference to it goes.
        let targets = ProgramArray::try_from(ebpf.take_map("LB_BENCH_TARGET").context("LB_BENCH_TARGET")?)?;
        let template = Array::try_from(ebpf.take_map("LB_BENCH_FRAME").context("LB_BENCH_FRAME")?)?;
        let ct_state = Array::try_from(datapath::open_map(&fx.pin_dir, map_names::CT_STATE)?)?;
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(BENCH_FRAME_LEN as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&fx.eth0.to_ne_bytes());
        Ok(Bench { targets, template, ct_state, ctx })
    }

    /// Conntrack entries as the datapath counts them.
    pub fn ct_entries(&self) -> Result<u64> {
        Ok(self.ct_state.get(&0, 0)?.entries)
    }

    /// Tells the datapath's accounting about entries put into conntrack behind its back.
    fn count_entries(&mut self, added: u64) -> Result<()> {
        let mut state = self.ct_state.get(&0, 0)?;
        state.entries += added;
        Ok(self.ct_state.set(0, state, 0)?)
    }

    /// Runs `call` and reads back what it did.
    pub fn time(&mut self, fx: &mut Fixture, call: &Call) -> Result<Outcome> {
        ensure!(call.frame.len() == BENCH_FRAME_LEN, "the wrapper restores frames of {BENCH_FRAME_LEN} bytes");
        let name = match call.program {
            Program::Empty => {
                ensure!(call.new_flows_from.is_none(), "only the wrapper gives runs new flows");
                program_names::XDP_PASS
            }
            Program::Wrapped(target) => {
                let target: &Xdp = fx.dp.ebpf_mut().program(target).context(target)?.try_into()?;
                self.targets.set(0, target.fd()?, 0)?;
                let frame = BenchFrame {
                    bytes: call.frame.try_into()?,
                    _pad: [0; 2],
                    new_flow_each_run: call.new_flows_from.is_some() as u32,
                    runs: call.new_flows_from.unwrap_or(0),
                };
                self.template.set(0, frame, 0)?;
                program_names::BENCH_RESTORE
            }
        };
        let counters_before = fx.counters();
        let entries_before = self.ct_entries()?;
        let program: &Xdp = fx.dp.ebpf_mut().program(name).context(name)?.try_into()?;
        let mut out = vec![0u8; BENCH_FRAME_LEN + 256];
        let r = program.test_run(TestRunOptions {
            data_in: Some(call.frame),
            data_out: Some(&mut out),
            ctx_in: Some(&self.ctx),
            repeat: call.repeat,
            ..TestRunOptions::new()
        })?;
        out.truncate(r.data_size_out as usize);
        let meta = split_meta(&mut out, BENCH_FRAME_LEN, r.return_value);
        let counters_after = fx.counters();
        let counters = counters_after
            .iter()
            .map(|(label, after)| (*label, after - counters_before[label]))
            .filter(|(_, delta)| *delta != 0)
            .collect();
        Ok(Outcome {
            ns_per_run: r.duration.as_nanos() as u64,
            action: r.return_value,
            out,
            meta,
            counters,
            ct_entries: self.ct_entries()? as i64 - entries_before as i64,
            runs: self.template.get(&0, 0)?.runs,
        })
    }
}

/// The machine a benchmark ran on, for its record: kernel, CPU model, CPUs.
pub fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']));
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("machine: kernel {}, {}, {cpus} CPUs", kernel.trim(), model.unwrap_or("unknown CPU"))
}

/// The source the wrapper gives its run `n` when asked for new flows (lb-ebpf's bench.rs):
/// port 1024 + n % 60000, the address's low 16 bits plus n / 60000.
pub fn wrapper_source(base: Ipv4Addr, n: u32) -> SocketAddrV4 {
    let o = base.octets();
    let low = u16::from_be_bytes([o[2], o[3]]).wrapping_add((n / 60_000) as u16).to_be_bytes();
    SocketAddrV4::new(Ipv4Addr::new(o[0], o[1], low[0], low[1]), (1024 + n % 60_000) as u16)
}

/// `frame` moved to the first source address of `frame.src`, + 256, + 512, ... (at most 256
/// tries) from which none of the wrapper's first `runs` new flows carries a TCP checksum
/// the datapath takes for a partial one. By chance one checksum in 65 536 does, and XDP
/// then hands the packet to tc (counted xdp_to_tc) rather than translating it; the
/// wrapper's consecutive source ports sweep the checksum through consecutive values, so
/// nearly every 60 000 runs from one address hold one such packet. Moving the address by
/// 256 moves that packet's run by 512, out of the runs used in time.
pub fn clear_of_partial_lookalikes(frame: &Frame, runs: u32) -> Result<Frame> {
    let bytes = frame.bytes();
    let segment = &bytes[34..];
    // The segment's sum without its checksum and source port, which the runs change.
    let fixed: u32 = segment
        .chunks(2)
        .enumerate()
        .filter(|(i, _)| ![0, 8].contains(i))
        .map(|(_, w)| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum();
    let words = |ip: Ipv4Addr| (u32::from(ip) >> 16) + (u32::from(ip) & 0xffff);
    let len = segment.len() as u16;
    let dst = addr_be(*frame.dst.ip());
    // Runs n..n+60000 share a source address (the wrapper's blocks); only the port moves.
    let clear = |base: Ipv4Addr| {
        (0..runs).step_by(60_000).all(|first| {
            let src = *wrapper_source(base, first).ip();
            let pseudo = words(src) + words(*frame.dst.ip()) + frame.proto as u32 + len as u32;
            (first..runs.min(first + 60_000)).all(|n| {
                let port = 1024 + n % 60_000;
                let check = checksum(&[], pseudo + fixed + port);
                let in_memory = u16::from_ne_bytes(check.to_be_bytes());
                !checksum::looks_partial(in_memory, addr_be(src), dst, frame.proto, len)
            })
        })
    };
    (0..256)
        .map(|k| Ipv4Addr::from(u32::from(*frame.src.ip()) + 256 * k))
        .find(|base| clear(*base))
        .map(|base| Frame { src: SocketAddrV4::new(base, frame.src.port()), ..frame.clone() })
        .with_context(|| format!("no source from {} gives {runs} runs without a partial-looking checksum", frame.src))
}

/// BPF_NOEXIST: an insert that fails rather than overwrite an entry.
const BPF_NOEXIST: u64 = 1;

/// A flow as the datapath stores it: both halves, each under its key.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub forward: (CtKey, CtValue),
    pub reply: (CtKey, CtValue),
}

impl Flow {
    /// The flow tracked for packets with key `forward`, both halves read from the fixture.
    pub fn read(fx: &Fixture, forward: CtKey) -> Result<Flow> {
        let fv = fx.half(&forward).with_context(|| format!("no flow {forward}"))?;
        let reply = peer_of(&forward, &fv);
        let rv = fx.half(&reply).with_context(|| format!("flow {forward} has no reply half {reply}"))?;
        Ok(Flow { forward: (forward, fv), reply: (reply, rv) })
    }

    /// Is the NAT port in the reply half's key (the flow's source was rewritten)?
    pub fn snat(&self) -> bool {
        self.forward.1.flags & ct_flags::SNAT != 0
    }

    /// The same flow to another backend of its frontend (`id` in LB_BACKENDS, holding
    /// `backend`); a cached next hop stays, so the backend must be reached the same way.
    pub fn to_backend(&self, id: u32, backend: Backend) -> Flow {
        let ((fk, mut fv), (mut rk, mut rv)) = (self.forward, self.reply);
        (fv.nat_dst_addr_be, fv.nat_dst_port_be) = (backend.addr_be, backend.port_be);
        (rk.src_addr_be, rk.src_port_be) = (backend.addr_be, backend.port_be);
        for v in [&mut fv, &mut rv] {
            (v.backend_id, v.backend_gen) = (id, backend.gen);
        }
        Flow { forward: (fk, fv), reply: (rk, rv) }
    }

    /// The flow the datapath would hold for the same frontend and backend after another
    /// client's handshake: that client's addresses (and, with SNAT, `nat_port` in place of
    /// this flow's), this flow's state bits and established, both halves stamped with
    /// `nonce` at `now`. The forward
    /// half keeps its cached next hop (toward the backend); the reply half's, toward the
    /// client, is dropped.
    pub fn like(&self, client: SocketAddrV4, nat_port: u16, nonce: u32, now: u32) -> Flow {
        let ((mut fk, mut fv), (mut rk, mut rv)) = (self.forward, self.reply);
        let (addr, port) = (addr_be(*client.ip()), client.port().to_be());
        (fk.src_addr_be, fk.src_port_be) = (addr, port);
        (rv.nat_dst_addr_be, rv.nat_dst_port_be) = (addr, port);
        if self.snat() {
            fv.nat_src_port_be = nat_port.to_be();
            rk.dst_port_be = nat_port.to_be();
        } else {
            (fv.nat_src_addr_be, fv.nat_src_port_be) = (addr, port);
            (rk.dst_addr_be, rk.dst_port_be) = (addr, port);
        }
        for v in [&mut fv, &mut rv] {
            v.stamp = stamp(nonce, now);
            v.state |= bits::ESTABLISHED;
        }
        fv.hop_nonce = nonce;
        (rv.hop_ifindex, rv.hop_mtu, rv.hop_dmac, rv.hop_smac, rv.hop_nonce) = (0, 0, [0; 6], [0; 6], 0);
        Flow { forward: (fk, fv), reply: (rk, rv) }
    }

    /// Are the halves one flow by the datapath's rules: each the other's peer, one nonce?
    pub fn is_whole(&self) -> bool {
        let ((fk, fv), (rk, rv)) = (&self.forward, &self.reply);
        peer_of(fk, fv) == *rk && peer_of(rk, rv) == *fk && fv.stamp >> 32 == rv.stamp >> 32 && fv.stamp >> 32 != 0
    }
}

/// Conntrack's time now, in the datapath's units (CLOCK_MONOTONIC_COARSE).
pub fn ct_now() -> u32 {
    units(coarse_now_ns())
}

/// Puts flows straight into the fixture's conntrack (never over an entry: BPF_NOEXIST) and
/// counts them as the datapath would have: their entries in LB_CT_STATE, the live ones in
/// their backends' LB_BE_LIVE. Returns the entries added.
pub fn insert_flows(fx: &Fixture, bench: &mut Bench, flows: impl IntoIterator<Item = Flow>) -> Result<u64> {
    let mut table: HashMap<MapData, CtKey, CtValue> =
        HashMap::try_from(datapath::open_map(&fx.pin_dir, map_names::CONNTRACK)?)?;
    let mut added = 0;
    let mut live: BTreeMap<u32, u64> = BTreeMap::new();
    for flow in flows {
        ensure!(flow.is_whole(), "not a whole flow: {flow:?}");
        for (key, value) in [flow.forward, flow.reply] {
            // Each half names its own key, as the datapath checks.
            table.insert(key, CtValue { key, ..value }, BPF_NOEXIST).with_context(|| format!("inserting {key}"))?;
            added += 1;
        }
        if flow.forward.1.state & bits::LIVE != 0 {
            *live.entry(flow.forward.1.backend_id).or_default() += 1;
        }
    }
    bench.count_entries(added)?;
    let mut counts: Array<MapData, u64> = Array::try_from(datapath::open_map(&fx.pin_dir, map_names::BACKEND_LIVE)?)?;
    for (backend, n) in live {
        let now = counts.get(&backend, 0)?;
        counts.set(backend, now + n, 0)?;
    }
    Ok(added)
}

/// Opens a flow through the datapath as a client would: SYN, the backend's SYN-ACK, ACK,
/// each a test run of the XDP program. Returns the flow, established.
pub fn handshake(fx: &mut Fixture, client: SocketAddrV4, frontend: SocketAddrV4) -> Result<Flow> {
    let key = ct_key(client, frontend, IPPROTO_TCP);
    let (action, _, _) = fx.xdp(&Frame::tcp(client, frontend, SYN).bytes());
    ensure!([XDP_TX, XDP_PASS].contains(&action), "SYN {client} -> {frontend}: action {action}");
    let (rk, _) = Flow::read(fx, key)?.reply;
    let backend = SocketAddrV4::new(ip_from_be(rk.src_addr_be), u16::from_be(rk.src_port_be));
    let answered = SocketAddrV4::new(ip_from_be(rk.dst_addr_be), u16::from_be(rk.dst_port_be));
    let answer = Frame::tcp(backend, answered, SYN | ACK).bytes();
    if is_local_pod(*backend.ip()) {
        fx.tc_pod(&answer);
    } else {
        fx.xdp(&answer);
    }
    fx.xdp(&Frame::tcp(client, frontend, ACK).bytes());
    let flow = Flow::read(fx, key)?;
    ensure!(
        flow.is_whole() && [flow.forward.1.state, flow.reply.1.state].iter().all(|s| phase(*s) == Phase::Established),
        "the handshake {client} -> {frontend} did not establish a flow: {flow:?}"
    );
    Ok(flow)
}

/// Writes frontends straight into a fixture's service maps through the reconciler's store,
/// in the reconciler's layout and order (backends, their slots, the service entry naming
/// them; the frontend filter's bits when done), with ids after those in use. For scale: at
/// 100k Services the manifests, the model and the reconciler itself take most of a minute
/// in a debug build, which is a control-plane question, not this benchmark's.
pub struct ServiceWriter {
    store: PinnedMaps,
    /// Frontends as the reconciler wrote them, and their first backends, by key.
    templates: BTreeMap<ServiceKey, (ServiceValue, Backend)>,
    last_svc_id: u32,
    last_backend_id: u32,
    filter: BTreeMap<u32, u64>,
    touched: std::collections::BTreeSet<u32>,
}

impl ServiceWriter {
    pub fn open(fx: &Fixture) -> Result<ServiceWriter> {
        let store = PinnedMaps::open(&fx.pin_dir)?;
        let slots: BTreeMap<SlotKey, u32> = store.slots()?.into_iter().collect();
        let backends: BTreeMap<u32, Backend> = store.backends()?.into_iter().collect();
        let services = store.services()?;
        let templates = services
            .iter()
            .filter_map(|(key, v)| {
                let first = slots.get(&SlotKey::new(v.svc_id, v.gen, 0, 0))?;
                Some((*key, (*v, *backends.get(first)?)))
            })
            .collect();
        let last_svc_id = services.iter().map(|(_, v)| v.svc_id).max().unwrap_or(0);
        let last_backend_id = backends.keys().max().copied().unwrap_or(0);
        let filter = store.filter_words()?.into_iter().collect();
        Ok(ServiceWriter { store, templates, last_svc_id, last_backend_id, filter, touched: Default::default() })
    }

    /// Frontend `key` to `backends`, each entry like the reconciler's for frontend `like`
    /// and its first backend (flags, algorithm, affinity scope) but for its own ids and
    /// addresses; new backend ids start at generation 1, as the reconciler's do. Returns
    /// the backends' ids and entries.
    pub fn add(&mut self, key: ServiceKey, like: ServiceKey, backends: &[SocketAddrV4]) -> Result<Vec<(u32, Backend)>> {
        let (template, like_backend) = *self.templates.get(&like).context("no template frontend with a backend")?;
        self.last_svc_id += 1;
        let svc_id = self.last_svc_id;
        let mut written = Vec::new();
        // Whose the ids are (the reconciler's hash of the Service port): this frontend's, and
        // its scope, which the datapath checks a chosen backend against.
        let owner = (key.addr_be as u64) << 16 | key.port_be as u64;
        let scope = lb_common::affinity_scope(owner);
        for (position, addr) in backends.iter().enumerate() {
            self.last_backend_id += 1;
            let backend =
                Backend { addr_be: addr_be(*addr.ip()), port_be: addr.port().to_be(), gen: 1, owner, ..like_backend };
            self.store.put_backend(self.last_backend_id, backend)?;
            self.store.put_slot(SlotKey::new(svc_id, 0, 0, position as u32), self.last_backend_id)?;
            written.push((self.last_backend_id, backend));
        }
        let value = ServiceValue { svc_id, count: [backends.len() as u16, 0], gen: 0, scope, key, ..template };
        self.store.put_service(key, value)?;
        let bit = front_filter_bit(key.addr_be, key.port_be);
        *self.filter.entry(bit / 64).or_default() |= 1 << (bit % 64);
        self.touched.insert(bit / 64);
        Ok(written)
    }

    /// Sets the frontend filter's bits of the frontends added: the last write, as the
    /// reconciler orders it.
    pub fn finish(mut self) -> Result<()> {
        for index in &self.touched {
            self.store.put_filter_word(*index, self.filter[index])?;
        }
        Ok(())
    }
}

/// SplitMix64: a small, seeded generator, so a run's random choices can be repeated.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A conntrack nonce: never 0, which marks a half being removed.
    pub fn nonce(&mut self) -> u32 {
        (self.next_u64() as u32) | 1
    }

    /// `items` in a random order (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapper_sequence_moves_port_then_address() {
        let base = Ipv4Addr::new(198, 18, 0, 1);
        assert_eq!(wrapper_source(base, 0), SocketAddrV4::new(base, 1024));
        assert_eq!(wrapper_source(base, 59_999), SocketAddrV4::new(base, 61_023));
        assert_eq!(wrapper_source(base, 60_000), SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 1024));
        assert_eq!(wrapper_source(Ipv4Addr::new(198, 18, 0, 255), 60_000).ip(), &Ipv4Addr::new(198, 18, 1, 0));
    }

    #[test]
    fn runs_clear_of_partial_lookalikes_have_none() {
        let frame = Frame::tcp(
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 1024),
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 10), 30080),
            SYN,
        );
        let runs = 130_000;
        let clear = clear_of_partial_lookalikes(&frame, runs).unwrap();
        let mut hits = 0;
        for n in 0..runs {
            // Built from scratch, with every checksum computed, as the runs' frames are.
            let bytes = Frame { src: wrapper_source(*clear.src.ip(), n), ..clear.clone() }.bytes();
            let check = u16::from_ne_bytes([bytes[50], bytes[51]]);
            let addr = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
            hits += checksum::looks_partial(check, addr(26), addr(30), IPPROTO_TCP, 20) as u32;
        }
        assert_eq!(hits, 0);
        let unlucky = (0..runs).filter(|n| {
            let bytes = Frame { src: wrapper_source(*frame.src.ip(), *n), ..frame.clone() }.bytes();
            let addr = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
            checksum::looks_partial(u16::from_ne_bytes([bytes[50], bytes[51]]), addr(26), addr(30), IPPROTO_TCP, 20)
        });
        assert!(unlucky.count() > 0, "the first address has runs XDP hands to tc: the search had work to do");
    }
}

/// Why a benchmark row has no figure.
pub enum Refusal {
    /// The datapath did something else than the row claims (or a request failed).
    Disagrees(String),
    /// A call's conditions could not be met (a busy machine): shown, not a failure.
    Unmeasured(String),
}

/// Where a benchmark row stands after its calls: why it has no figure, if so, and what its
/// first call proved.
#[derive(Default)]
pub struct Standing {
    pub refused: Option<String>,
    /// Refused only because a call could not be made under its conditions, not because the
    /// datapath did something else than the row claims.
    pub unmeasured: bool,
    pub proof: String,
}

impl Standing {
    /// Takes in round `round`'s call: its sample when the call counts. A disagreement
    /// refuses the row whatever came before; an unmeasured call marks it only if nothing
    /// refused it already.
    pub fn record<T>(&mut self, round: usize, checked: Result<(T, String), Refusal>) -> Option<T> {
        match checked {
            Ok((sample, proof)) => {
                if self.proof.is_empty() {
                    self.proof = proof;
                }
                return Some(sample);
            }
            Err(Refusal::Disagrees(why)) => {
                self.unmeasured = false;
                self.refused = Some(format!("round {}: {why}", round + 1));
            }
            Err(Refusal::Unmeasured(why)) => {
                if self.refused.is_none() {
                    self.unmeasured = true;
                    self.refused = Some(format!("round {}: {why}", round + 1));
                }
            }
        }
        None
    }

    /// Shown with its figure, or as NOT MEASURED: only a disagreement fails a run.
    pub fn passes(&self) -> bool {
        self.refused.is_none() || self.unmeasured
    }
}
