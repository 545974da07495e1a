//! Per-packet cost of the XDP program, measured with BPF_PROG_TEST_RUN in one run next to
//! an empty XDP program, and printed as ratios. Every case runs behind the same restoring
//! wrapper (see lb-ebpf's bench.rs), so each run sees the intended packet; the wrapper
//! in front of the empty program is the floor. Not a test: nothing here asserts a time.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, ProgramArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{program_names, BenchFrame, BENCH_FRAME_LEN};
use lb_tests::{
    fixture::{with_fixture, Fixture, CLIENT, NODE},
    packet::{Frame, ACK, SYN},
};

/// Rounds per case; the fastest counts: for code of fixed cost, interference (another
/// process, the kernel tearing down namespaces) only ever adds time.
const ROUNDS: usize = 7;

struct Case {
    name: &'static str,
    target: &'static str,
    frame: Frame,
    new_flow_each_run: bool,
    repeat: u32,
}

fn main() -> Result<()> {
    // Every SNAT port is free for new flows: 7 rounds x 8 000 stay below the 64 512 ports.
    with_fixture(lb_tests::fixture::Setup::fast((1024, 65535)), run)
}

fn run(fx: &mut Fixture) -> Result<()> {
    let client = SocketAddrV4::new(CLIENT, 40000);
    let node = |port| SocketAddrV4::new(NODE, port);
    // The flow the "established" case follows: created once, then only its ACKs.
    fx.xdp(&Frame::tcp(client, node(30080), SYN).bytes());
    let cases = [
        Case {
            name: "empty program, no wrapper",
            target: "",
            frame: Frame::tcp(client, node(22), SYN),
            new_flow_each_run: false,
            repeat: 1_000_000,
        },
        Case {
            name: "wrapper + empty program (floor)",
            target: program_names::XDP_PASS,
            frame: Frame::tcp(client, node(22), SYN),
            new_flow_each_run: false,
            repeat: 1_000_000,
        },
        Case {
            name: "pass-through: not a service",
            target: program_names::XDP_UPLINK,
            frame: Frame::tcp(client, node(22), SYN),
            new_flow_each_run: false,
            repeat: 1_000_000,
        },
        Case {
            name: "established flow: DNAT+SNAT, XDP_TX",
            target: program_names::XDP_UPLINK,
            frame: Frame::tcp(client, node(30080), ACK),
            new_flow_each_run: false,
            repeat: 1_000_000,
        },
        Case {
            name: "new flow: DNAT to a local backend",
            target: program_names::XDP_UPLINK,
            frame: Frame::tcp(SocketAddrV4::new(Ipv4Addr::new(192, 168, 51, 1), 1024), node(30081), SYN),
            new_flow_each_run: true,
            repeat: 30_000,
        },
        Case {
            name: "new flow: DNAT+SNAT, XDP_TX",
            target: program_names::XDP_UPLINK,
            frame: Frame::tcp(SocketAddrV4::new(Ipv4Addr::new(192, 168, 52, 1), 1024), node(30080), SYN),
            new_flow_each_run: true,
            repeat: 8_000,
        },
    ];
    let ebpf = fx.dp.ebpf_mut();
    for name in [program_names::XDP_PASS, program_names::BENCH_RESTORE] {
        let p: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    let mut targets = ProgramArray::try_from(ebpf.take_map("LB_BENCH_TARGET").context("LB_BENCH_TARGET")?)?;
    let mut templates: Array<_, BenchFrame> =
        Array::try_from(ebpf.take_map("LB_BENCH_FRAME").context("LB_BENCH_FRAME")?)?;

    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(BENCH_FRAME_LEN as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&fx.eth0.to_ne_bytes());
    println!("XDP per-packet cost, BPF_PROG_TEST_RUN, best of {ROUNDS} rounds (lower is better)\n");
    println!("{:<40} {:>10} {:>14} {:>16}", "case", "ns/packet", "minus floor", "x empty program");
    // Rounds interleave the cases, so a noisy moment costs every case one sample, not one
    // case all of them.
    let mut best = vec![std::time::Duration::MAX; cases.len()];
    for _ in 0..ROUNDS {
        for (case, best) in cases.iter().zip(best.iter_mut()) {
            let bytes = case.frame.bytes();
            assert_eq!(bytes.len(), BENCH_FRAME_LEN);
            let name = if case.target.is_empty() { program_names::XDP_PASS } else { program_names::BENCH_RESTORE };
            if !case.target.is_empty() {
                let target: &Xdp = fx.dp.ebpf_mut().program(case.target).context(case.target)?.try_into()?;
                targets.set(0, target.fd()?, 0)?;
                let frame = BenchFrame {
                    bytes: bytes.clone().try_into().expect("54 bytes"),
                    _pad: [0; 2],
                    new_flow_each_run: case.new_flow_each_run as u32,
                    runs: 0,
                };
                templates.set(0, frame, 0)?;
            }
            let program: &Xdp = fx.dp.ebpf_mut().program(name).context(name)?.try_into()?;
            let mut out = [0u8; 256];
            let r = program.test_run(TestRunOptions {
                data_in: Some(&bytes),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: case.repeat,
                ..TestRunOptions::new()
            })?;
            *best = (*best).min(r.duration);
        }
    }
    let ns: Vec<f64> = best.iter().map(|d| d.as_nanos() as f64).collect();
    // cases[0] is the empty program alone, cases[1] the wrapper in front of it.
    let (empty, floor) = (ns[0], ns[1]);
    for (i, case) in cases.iter().enumerate() {
        let own = if i < 2 { "-".to_string() } else { format!("{:.1}", ns[i] - floor) };
        println!("{:<40} {:>10.1} {:>14} {:>16.2}", case.name, ns[i], own, ns[i] / empty);
    }
    Ok(())
}
