//! Per-packet cost of the XDP uplink program (BENCHMARKS.md has the method and results).
//! Every case runs with BPF_PROG_TEST_RUN and a large repeat behind the restoring wrapper
//! (lb-ebpf's bench.rs); the wrapper in front of the empty program is the floor a case's
//! own cost is measured over, and the empty program alone the unit of the ratios. Rounds
//! interleave the cases (across fixtures loaded side by side), so a noisy moment costs
//! every case one sample; best and median are reported.
//!
//! Every row proves what it measured: after every timed call, the datapath's own counters,
//! its conntrack accounting and the last frame out are checked against what the row says
//! (a new-flow row: new_flow grew by exactly the number of runs and established by 0, two
//! conntrack entries per run; an established row: established by the runs, new_flow by 0).
//! A row that disagrees in any round is not printed: why is, and the exit status is
//! non-zero. Targets are printed beside the results, not enforced: this is a measurement.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use aya::{
    maps::Array,
    programs::{ProgramInfo, Xdp},
};
use lb_common::{
    front_filter_bit, in_prefix, map_names, program_names, user::addr_be, Config, ServiceKey, IPPROTO_TCP,
    MAX_SERVICES, XDP_META_MARK, XDP_META_REDIRECT,
};
use lb_tests::{
    bench::{
        clear_of_partial_lookalikes, ct_now, handshake, insert_flows, wrapper_source, Bench, Call, Flow, Outcome,
        Program, Refusal, ServiceWriter, SplitMix64, Standing,
    },
    fixture::{
        ct_key, local_slices, with_fixture, with_fixtures, Fixture, Setup, CLIENT, LOCAL_POD, MANIFESTS, NODE,
        REMOTE_POD, XDP_PASS, XDP_TX,
    },
    packet::{checksums_ok, endpoints, Frame, ACK, SYN},
};
use lb_user::datapath::{
    self,
    conntrack::Conntrack,
    maps::{MapStore, PinnedMaps},
};

/// Interleaved rounds, unless --rounds says otherwise; odd, so the median is a sample.
const ROUNDS: usize = 9;
/// Runs per call of the cases that repeat one packet.
const REPEAT: u32 = 1_000_000;
/// New flows per call. Every call's are new 5-tuples (the wrapper's run counter carries
/// on across rounds), and all of them stay: the capacity checks below hold them.
const NEW_LOCAL_FLOWS: u32 = 20_000;
const NEW_SNAT_FLOWS: u32 = 7_000;
/// The SNAT range of the timed fixtures: the widest there is, for the new SNAT flows.
const SNAT_PORTS: (u16, u16) = (1024, 65535);
const LIVE_FLOWS: u32 = 1_000_000;
const SERVICES: u32 = 100_000;
/// The live flows go through this frontend to its backends, enough of them for each flow
/// its own NAT port (a backend has at most the range's 64 512).
const LIVE_FRONTEND_PORT: u16 = 30090;
const LIVE_BACKENDS: u32 = 17;
/// The cycling cases visit this many of the live flows in turn, one per run. The flows
/// were last seen at least IDLE ago, or (a warm-up call just before) less than WARM ago:
/// both bounds on the right side of the datapath's one-second refresh age, by more than a
/// tick of the coarse clock.
const CYCLE: u32 = 250_000;
const IDLE: Duration = Duration::from_millis(1050);
const WARM: Duration = Duration::from_millis(950);
/// Calls of a warm cycling case made before its row is refused for want of a quick enough one.
const WARM_ATTEMPTS: u32 = 5;

/// The fixtures of the timed cases, loaded side by side.
const FAST: usize = 0;
const NETFILTER: usize = 1;
const MANY_FLOWS: usize = 2;
const MANY_SERVICES: usize = 3;
/// Like FAST, with a preallocated conntrack table (`--conntrack-memory preallocated`).
const PREALLOCATED: usize = 4;

/// The NAT port test: Linux's default ephemeral range (28 232 ports), 90% of it taken.
const NAT_PORTS: (u16, u16) = (32768, 60999);
const NAT_TAKEN_PERCENT: u32 = 90;
/// New flows started against the taken range, in batches removed after each (so the
/// range stays within a point of 90% taken).
const NAT_FLOWS: u32 = 20_000;
const NAT_BATCH: u32 = 250;
const NAT_TARGET: f64 = 99.9;
/// Seeds the random choices (nonces, which ports are taken), so a run can be repeated.
const SEED: u64 = 0x6b75_6265_2d78_6470;

/// A NodePort of the selection rows: its algorithm (annotation), session affinity, and the
/// rows' names.
struct Algorithm {
    annotation: &'static str,
    affinity: bool,
    node_port: u16,
    new_flow: &'static str,
    established: &'static str,
}

const ALGORITHMS: [Algorithm; 6] = [
    Algorithm {
        annotation: "random",
        affinity: false,
        node_port: 31101,
        new_flow: "new flow, 5 backends: random",
        established: "established, 5 backends: random",
    },
    Algorithm {
        annotation: "round-robin",
        affinity: false,
        node_port: 31102,
        new_flow: "new flow, 5 backends: round-robin",
        established: "established, 5 backends: round-robin",
    },
    Algorithm {
        annotation: "maglev",
        affinity: false,
        node_port: 31103,
        new_flow: "new flow, 5 backends: maglev",
        established: "established, 5 backends: maglev",
    },
    Algorithm {
        annotation: "source-hash",
        affinity: false,
        node_port: 31104,
        new_flow: "new flow, 5 backends: source-hash",
        established: "established, 5 backends: source-hash",
    },
    Algorithm {
        annotation: "least-conn",
        affinity: false,
        node_port: 31105,
        new_flow: "new flow, 5 backends: least-conn",
        established: "established, 5 backends: least-conn",
    },
    Algorithm {
        annotation: "random",
        affinity: true,
        node_port: 31106,
        new_flow: "new flow, 5 backends: random + affinity",
        established: "established, 5 backends: random + affinity",
    },
];
/// New flows per call of each selection row.
const NEW_SELECTION_FLOWS: u32 = 2_000;
/// New flows whose spread over the backends the selection figures count.
const SPREAD_FLOWS: u32 = 10_000;
/// The Maglev figures' second table: this many backends (on the other node).
const MAGLEV_WIDE: usize = 10;
const MAGLEV_WIDE_PORT: u16 = 31110;

/// Algorithm `a`'s five backends: local pods, each Service its own.
fn selection_backends(a: usize) -> Vec<SocketAddrV4> {
    (0..5).map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 100 + 10 * a as u8 + i), 8080)).collect()
}

/// The client of algorithm `a`'s established row.
fn selection_client(a: usize) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, 41000 + a as u16)
}

/// A NodePort Service (ClusterIP 10.96.8.`n`) with these endpoints, on node1 or node2 as
/// their address says.
fn node_port_service(
    name: &str,
    n: u8,
    annotation: &str,
    affinity: bool,
    node_port: u16,
    backends: &[SocketAddrV4],
) -> String {
    let affinity = if affinity { ", sessionAffinity: ClientIP" } else { "" };
    let endpoints: Vec<String> = backends
        .iter()
        .map(|b| format!("{{addresses: [\"{}\"], nodeName: node{}}}", b.ip(), b.ip().octets()[2]))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, annotations: {{lb.kube-xdp.io/algorithm: {annotation}}}}}\nspec: {{type: NodePort, clusterIP: 10.96.8.{n}{affinity}, ports: [{{port: 80, nodePort: {node_port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
        endpoints.join(", ")
    )
}

/// The fixture's manifests with the selection rows' Services, and the wide Maglev one with
/// these backends.
fn selection_manifests(wide: &[SocketAddrV4]) -> String {
    let mut yaml = MANIFESTS.to_string() + &local_slices();
    for (a, algorithm) in ALGORITHMS.iter().enumerate() {
        let name = format!("selection-{a}");
        let backends = selection_backends(a);
        yaml += &node_port_service(
            &name,
            a as u8 + 1,
            algorithm.annotation,
            algorithm.affinity,
            algorithm.node_port,
            &backends,
        );
    }
    yaml + &node_port_service("maglev-wide", 20, "maglev", false, MAGLEV_WIDE_PORT, wide)
}

fn maglev_wide_backends() -> Vec<SocketAddrV4> {
    (0..MAGLEV_WIDE as u8).map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 100 + i), 8080)).collect()
}
const NAT_TEST: &str = "NAT port allocation";
const SELECTION_FIGURES: &str = "selection figures";

const ESTABLISHED: &str = "established NodePort: DNAT+SNAT, XDP_TX";

/// What every timed call of a case must show.
struct Expect {
    action: u32,
    /// Counters that grow by exactly the number of runs; every other one stays put.
    counters: &'static [&'static str],
    /// The hand-over tag XDP leaves for tc in front of a packet it passes translated.
    tag: Option<u32>,
    out: Out,
    /// Conntrack entries each run adds (a new flow: both halves).
    entries_per_run: i64,
}

/// The last frame out.
enum Out {
    /// Passed untouched.
    Unchanged,
    /// Sent to one of `dst`, from the node's address and a port of the SNAT range (`snat`)
    /// or from the run's own source.
    Translated { dst: Vec<SocketAddrV4>, snat: bool },
}

/// Where a passing packet stops in the datapath: checked against the fixture's
/// configuration and maps before timing, with the datapath's own screening functions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Screen {
    /// Nothing to check: the packet is translated, or the program is not the datapath.
    Any,
    /// The frontend filter says no and the packet cannot be a reply: no conntrack lookup.
    SkipsConntrack,
    /// The frontend filter says no, but the packet may be a reply (to the node's SNAT
    /// range or into the pod prefix): one conntrack lookup, which misses.
    MissesConntrack,
}

enum Goal {
    None,
    /// Own cost over the floor, in ns, and Katran's on this machine type.
    OwnAtMost {
        ns: u64,
        katran: u64,
    },
    /// Own cost at most `ratio` times the own cost of case `of`.
    RatioAtMost {
        of: &'static str,
        ratio: f64,
    },
    /// No target; own cost shown as a multiple of case `of`'s, which `label` names.
    Compare {
        of: &'static str,
        label: &'static str,
    },
}

/// Where each run's source comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sources {
    /// The frame's own, every run.
    Fixed,
    /// A new one every run (the wrapper's new_flow_each_run), one no earlier run of any
    /// round had: every run starts a new flow.
    New,
    /// The first CYCLE live flows' clients, one per run, from the first in every call. Each
    /// flow was last seen over a second ago (IDLE: so the packet refreshes its flow's stamp,
    /// both halves, and looks its next hop up again) or, after a warm-up call, less than
    /// WARM ago (so it does neither, like the single established flow).
    Cycle { warm: bool },
}

impl Sources {
    fn varied(self) -> bool {
        self != Sources::Fixed
    }
}

struct Case {
    name: &'static str,
    fixture: usize,
    program: Program,
    frame: Frame,
    sources: Sources,
    repeat: u32,
    screen: Screen,
    expect: Expect,
    goal: Goal,
}

/// The cases, in the order of the table; `live_clients` is where the live flows' clients
/// start (see `add_live_flows`).
fn cases(live_clients: Ipv4Addr) -> Vec<Case> {
    let client = SocketAddrV4::new(CLIENT, 40000);
    let node = |port| SocketAddrV4::new(NODE, port);
    let remote = SocketAddrV4::new(REMOTE_POD, 8080);
    let untouched =
        |counters| Expect { action: XDP_PASS, counters, tag: None, out: Out::Unchanged, entries_per_run: 0 };
    let established = |fixture, name| Case {
        name,
        fixture,
        program: Program::Wrapped(program_names::XDP_UPLINK),
        frame: Frame::tcp(client, node(30080), ACK),
        sources: Sources::Fixed,
        repeat: REPEAT,
        screen: Screen::Any,
        expect: Expect {
            action: XDP_TX,
            counters: &["established", "xdp_tx"],
            tag: None,
            out: Out::Translated { dst: vec![remote], snat: true },
            entries_per_run: 0,
        },
        goal: Goal::RatioAtMost { of: ESTABLISHED, ratio: 1.2 },
    };
    let new_local = |fixture, name| Case {
        name,
        fixture,
        program: Program::Wrapped(program_names::XDP_UPLINK),
        frame: Frame::tcp(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 1024), node(30081), SYN),
        sources: Sources::New,
        repeat: NEW_LOCAL_FLOWS,
        screen: Screen::Any,
        expect: Expect {
            action: XDP_PASS,
            counters: &["new_flow"],
            tag: Some(XDP_META_REDIRECT),
            out: Out::Translated { dst: vec![SocketAddrV4::new(LOCAL_POD, 8080)], snat: false },
            entries_per_run: 2,
        },
        goal: Goal::None,
    };
    let new_snat = |fixture, name, goal| Case {
        name,
        fixture,
        program: Program::Wrapped(program_names::XDP_UPLINK),
        frame: Frame::tcp(SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 1024), node(30080), SYN),
        sources: Sources::New,
        repeat: NEW_SNAT_FLOWS,
        screen: Screen::Any,
        expect: Expect {
            action: XDP_TX,
            counters: &["new_flow", "xdp_tx"],
            tag: None,
            out: Out::Translated { dst: vec![remote], snat: true },
            entries_per_run: 2,
        },
        goal,
    };
    let pass = |name, dst, screen| Case {
        name,
        fixture: FAST,
        program: Program::Wrapped(program_names::XDP_UPLINK),
        frame: Frame::tcp(client, dst, ACK),
        sources: Sources::Fixed,
        repeat: REPEAT,
        screen,
        expect: untouched(&["pass_not_service"]),
        goal: Goal::OwnAtMost { ns: 40, katran: 57 },
    };
    // The last run's flow goes to the live backend its run number picks.
    let last_backend = SocketAddrV4::new(live_backend((CYCLE - 1) % LIVE_BACKENDS), 8080);
    let cycle = |warm, name| Case {
        frame: Frame::tcp(SocketAddrV4::new(live_clients, 1024), node(LIVE_FRONTEND_PORT), ACK),
        sources: Sources::Cycle { warm },
        repeat: CYCLE,
        expect: Expect {
            out: Out::Translated { dst: vec![last_backend], snat: true },
            ..established(MANY_FLOWS, "").expect
        },
        goal: Goal::Compare { of: ESTABLISHED, label: "established" },
        ..established(MANY_FLOWS, name)
    };
    vec![
        Case {
            name: "empty XDP program, no wrapper",
            program: Program::Empty,
            expect: untouched(&[]),
            goal: Goal::None,
            ..pass("", node(22), Screen::Any)
        },
        Case {
            name: "wrapper + empty program (floor)",
            program: Program::Wrapped(program_names::XDP_PASS),
            expect: untouched(&[]),
            goal: Goal::None,
            ..pass("", node(22), Screen::Any)
        },
        pass("pass: TCP to node:22, conntrack skipped", node(22), Screen::SkipsConntrack),
        pass("pass: to node:45000 (SNAT range), ct miss", node(45000), Screen::MissesConntrack),
        pass("pass: to a pod, conntrack miss", SocketAddrV4::new(LOCAL_POD, 5201), Screen::MissesConntrack),
        Case { goal: Goal::OwnAtMost { ns: 140, katran: 147 }, ..established(FAST, ESTABLISHED) },
        Case {
            expect: Expect {
                action: XDP_PASS,
                counters: &["established"],
                tag: Some(XDP_META_MARK),
                out: Out::Translated { dst: vec![remote], snat: false },
                entries_per_run: 0,
            },
            goal: Goal::None,
            ..established(NETFILTER, "established NodePort, netfilter: DNAT, pass")
        },
        new_local(FAST, "new flow: DNAT to a local backend"),
        new_snat(FAST, "new flow: DNAT+SNAT (NAT port), XDP_TX", Goal::OwnAtMost { ns: 380, katran: 399 }),
        new_local(PREALLOCATED, "new flow: DNAT to a local backend, preallocated conntrack"),
        new_snat(PREALLOCATED, "new flow: DNAT+SNAT (NAT port), XDP_TX, preallocated conntrack", Goal::None),
        established(MANY_FLOWS, "established, with 1M live flows"),
        cycle(false, "established, 1M live, cycling 250k, idle > 1 s"),
        cycle(true, "established, 1M live, cycling 250k, idle < 1 s"),
        established(MANY_SERVICES, "established, with 100k Services"),
    ]
    .into_iter()
    .chain(selection_cases())
    .collect()
}

/// Backend selection: a new flow and an established one through a NodePort of each
/// algorithm (five local backends, DNAT only, so what differs is the choice), next to
/// random.
fn selection_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (a, algorithm) in ALGORITHMS.iter().enumerate() {
        let front = SocketAddrV4::new(NODE, algorithm.node_port);
        let dst = selection_backends(a);
        let translated = |counters| Expect {
            action: XDP_PASS,
            counters,
            tag: Some(XDP_META_REDIRECT),
            out: Out::Translated { dst: dst.clone(), snat: false },
            entries_per_run: 0,
        };
        let against = |of| if a == 0 { Goal::None } else { Goal::Compare { of, label: "random" } };
        cases.push(Case {
            name: algorithm.new_flow,
            fixture: FAST,
            program: Program::Wrapped(program_names::XDP_UPLINK),
            frame: Frame::tcp(SocketAddrV4::new(Ipv4Addr::new(198, 20 + a as u8, 0, 1), 1024), front, SYN),
            sources: Sources::New,
            repeat: NEW_SELECTION_FLOWS,
            screen: Screen::Any,
            expect: Expect { entries_per_run: 2, ..translated(&["new_flow"]) },
            goal: against(ALGORITHMS[0].new_flow),
        });
        cases.push(Case {
            name: algorithm.established,
            fixture: FAST,
            program: Program::Wrapped(program_names::XDP_UPLINK),
            frame: Frame::tcp(selection_client(a), front, ACK),
            sources: Sources::Fixed,
            repeat: REPEAT,
            screen: Screen::Any,
            expect: translated(&["established"]),
            goal: against(ALGORITHMS[0].established),
        });
    }
    cases
}

/// A case's samples, or why it has none to show.
struct Row {
    ns: Vec<u64>,
    standing: Standing,
    /// The wrapper's run counter: where the case's next new flows start.
    next_run: u32,
}

impl Row {
    fn best(&self) -> u64 {
        *self.ns.iter().min().expect("samples")
    }
    fn median(&self) -> u64 {
        let mut s = self.ns.clone();
        s.sort_unstable();
        s[s.len() / 2]
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench: some results were refused (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `bench [--rounds N] [--only TEXT]`: --only runs the cases whose name contains TEXT (and
/// the empty program and the floor; "NAT" selects the NAT port test), for profiling one.
#[derive(Clone)]
struct Options {
    rounds: usize,
    only: Option<String>,
}

impl Options {
    fn parse() -> Result<Options> {
        let mut options = Options { rounds: ROUNDS, only: None };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--rounds" => options.rounds = value()?.parse().context("--rounds")?,
                "--only" => options.only = Some(value()?),
                _ => anyhow::bail!("unknown argument {arg}; usage: bench [--rounds N] [--only TEXT]"),
            }
        }
        ensure!(options.rounds > 0, "--rounds must be at least 1");
        Ok(options)
    }

    fn selects(&self, name: &str) -> bool {
        self.only.as_ref().is_none_or(|text| name.contains(text.as_str()))
    }
}

fn run() -> Result<bool> {
    let options = Options::parse()?;
    println!("{}", lb_tests::bench::machine());
    let many_flows = Setup {
        conntrack_entries: 2 * LIVE_FLOWS + 65_536,
        admit_limit: 2 * LIVE_FLOWS + 65_536,
        ..Setup::fast(SNAT_PORTS)
    };
    // Room for the 100k Services' frontend and backend ids (and the fixture's own).
    let many_services = Setup { frontends: MAX_SERVICES, backends: MAX_SERVICES, ..Setup::fast(SNAT_PORTS) };
    let preallocated = Setup { conntrack_memory: datapath::ConntrackMemory::Preallocated, ..Setup::fast(SNAT_PORTS) };
    let setups = vec![Setup::fast(SNAT_PORTS), Setup::netfilter(SNAT_PORTS), many_flows, many_services, preallocated];
    let o = options.clone();
    let timed = with_fixtures(setups, move |fixtures| timed(fixtures, &o))?;
    let figures = !options.selects(SELECTION_FIGURES) || with_fixture(Setup::fast(SNAT_PORTS), selection_figures)?;
    // Last: its counters failing to agree ends the run (with why, and a non-zero exit).
    if options.selects(NAT_TEST) {
        with_fixture(Setup::fast(NAT_PORTS), nat_port_allocation)?;
    }
    Ok(timed && figures)
}

fn timed(fixtures: &mut [Fixture], options: &Options) -> Result<bool> {
    let rounds = options.rounds;
    let live_clients = live_clients()?;
    // The empty program and the floor (the first two) always run: every other row needs them.
    let mut cases: Vec<Case> = cases(live_clients)
        .into_iter()
        .enumerate()
        .filter(|(i, c)| *i < 2 || options.selects(c.name))
        .map(|(_, c)| c)
        .collect();
    for case in cases.iter_mut().filter(|c| c.sources == Sources::New) {
        case.frame = clear_of_partial_lookalikes(&case.frame, rounds as u32 * case.repeat)?;
    }
    let mut benches: Vec<Bench> = fixtures.iter_mut().map(Bench::new).collect::<Result<_>>()?;
    prepare(fixtures, &mut benches, &cases, live_clients)?;
    for fixture in [FAST, PREALLOCATED] {
        check_capacity(fixture, &fixtures[fixture], &benches[fixture], &cases, rounds)?;
    }
    // The wrapper's run counter starts at 0 in every fixture, and each case of a fixture
    // keeps its own count: its new flows never meet another's.
    let mut rows: Vec<Row> = cases
        .iter()
        .map(|case| Row {
            ns: Vec::new(),
            standing: Standing { refused: check_screen(&fixtures[case.fixture], case).err(), ..Standing::default() },
            next_run: 0,
        })
        .collect();
    // When a call last went through the live flows (their stamps were set at insertion).
    let mut live_seen = Instant::now();
    let started = Instant::now();
    for round in 0..rounds {
        // Each round starts at another case, so no case always follows the same one.
        for i in (0..cases.len()).map(|i| (i + round) % cases.len()) {
            let (case, row) = (&cases[i], &mut rows[i]);
            let (fx, bench) = (&mut fixtures[case.fixture], &mut benches[case.fixture]);
            let first_run = if case.sources == Sources::New { row.next_run } else { 0 };
            let (runs, checked) = time_case(case, fx, bench, first_run, &mut live_seen)?;
            row.next_run = runs;
            if let Some(sample) = row.standing.record(round, checked) {
                row.ns.push(sample);
            }
        }
    }
    println!("timed {rounds} rounds in {:.1} s\n", started.elapsed().as_secs_f64());
    print_table(&cases, &rows, rounds);
    print_programs(&mut fixtures[FAST])?;
    // A row the machine was too busy to measure is shown as such; only a disagreement
    // between what a row claims and what the datapath did fails the run.
    Ok(rows.iter().all(|r| r.standing.passes()))
}

/// A call's time per run and what it showed, or why its row is refused.
type Checked = Result<(u64, String), Refusal>;

/// A timed call of `case`, checked: the wrapper's run counter after it, and the time per
/// run with what the call showed, or why the row is refused. A cycling case's call is
/// timed as its `Sources::Cycle` says; `live_seen` is when a call last went through the
/// live flows.
fn time_case(
    case: &Case,
    fx: &mut Fixture,
    bench: &mut Bench,
    first_run: u32,
    live_seen: &mut Instant,
) -> Result<(u32, Checked)> {
    let frame = case.frame.bytes();
    let call = Call {
        program: case.program,
        frame: &frame,
        new_flows_from: case.sources.varied().then_some(first_run),
        repeat: case.repeat,
    };
    // A warm call's precondition (its flows seen less than WARM ago) can fail on a busy
    // machine: that is no measurement, and the call is made again, a few times at most.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut warm_up = None;
        match case.sources {
            Sources::Cycle { warm: false } => std::thread::sleep(IDLE.saturating_sub(live_seen.elapsed())),
            Sources::Cycle { warm: true } => warm_up = Some((Instant::now(), bench.time(fx, &call)?)),
            _ => {}
        }
        let o = bench.time(fx, &call)?;
        if let Sources::Cycle { .. } = case.sources {
            *live_seen = Instant::now();
        }
        if let Some((started, warm_up)) = &warm_up {
            if let Err(why) = verify(case, warm_up, first_run, fx) {
                return Ok((o.runs, Err(Refusal::Disagrees(format!("warm-up call: {why}")))));
            }
            // A flow's age at its measured visit is at most the time since the warm-up began.
            let took = live_seen.duration_since(*started);
            if took >= WARM {
                if attempt < WARM_ATTEMPTS {
                    continue;
                }
                let why = format!("{attempt} times, warm-up and call took over {WARM:?} (last {took:?})");
                return Ok((o.runs, Err(Refusal::Unmeasured(why))));
            }
        }
        return Ok((
            o.runs,
            verify(case, &o, first_run, fx).map(|proof| (o.ns_per_run, proof)).map_err(Refusal::Disagrees),
        ));
    }
}

/// Where the live flows' clients start: the wrapper's sources from there are the clients of
/// the live flows, and none of their first CYCLE packets looks partially checksummed.
fn live_clients() -> Result<Ipv4Addr> {
    let first = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 1024);
    let frame = Frame::tcp(first, SocketAddrV4::new(NODE, LIVE_FRONTEND_PORT), ACK);
    Ok(*clear_of_partial_lookalikes(&frame, CYCLE)?.src.ip())
}

/// The i-th live backend: on the other node, like the fixture's remote backend.
fn live_backend(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(REMOTE_POD) + 1 + i)
}

/// Opens each fixture's established flow (a handshake through the datapath), and fills
/// the scale fixtures that `cases` use.
fn prepare(fixtures: &mut [Fixture], benches: &mut [Bench], cases: &[Case], live_clients: Ipv4Addr) -> Result<()> {
    let frontend = SocketAddrV4::new(NODE, 30080);
    for fx in fixtures.iter_mut() {
        handshake(fx, SocketAddrV4::new(CLIENT, 40000), frontend)?;
    }
    if cases.iter().any(|c| ALGORITHMS.iter().any(|a| c.name == a.new_flow || c.name == a.established)) {
        let fx = &mut fixtures[FAST];
        fx.apply(&selection_manifests(&maglev_wide_backends()));
        // Resolved, as a node's own pods are once they have talked: the next hop is cached.
        for (i, b) in (0..ALGORITHMS.len()).flat_map(selection_backends).enumerate() {
            let mac = format!("02:00:00:00:01:{i:02x}");
            lb_tests::lab::run("ip", &["neigh", "replace", &b.ip().to_string(), "lladdr", &mac, "dev", "veth0"])?;
        }
        for (a, algorithm) in ALGORITHMS.iter().enumerate() {
            handshake(fx, selection_client(a), SocketAddrV4::new(NODE, algorithm.node_port))?;
        }
    }
    if cases.iter().any(|c| c.fixture == MANY_FLOWS) {
        add_live_flows(&mut fixtures[MANY_FLOWS], &mut benches[MANY_FLOWS], live_clients)?;
    }
    if cases.iter().any(|c| c.fixture == MANY_SERVICES) {
        add_many_services(&fixtures[MANY_SERVICES])?;
    }
    Ok(())
}

/// 100k more Services: ClusterIPs, each with a backend of its own.
fn add_many_services(fx: &Fixture) -> Result<()> {
    let started = Instant::now();
    let cluster_ip = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 10), 80, IPPROTO_TCP);
    let mut writer = ServiceWriter::open(fx)?;
    for i in 0..SERVICES {
        let key = ServiceKey::new(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i), 80, IPPROTO_TCP);
        let backend = SocketAddrV4::new(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 240, 0, 0)) + i), 8080);
        writer.add(key, cluster_ip, &[backend])?;
    }
    writer.finish()?;
    let count = MapStore::services(&PinnedMaps::open(&fx.pin_dir)?)?.len();
    ensure!(count > SERVICES as usize, "LB_SERVICES holds {count} frontends");
    println!("100k Services: LB_SERVICES holds {count} frontends, written in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// 1M more flows, live and established, straight into conntrack: NodePort flows with SNAT
/// through a frontend with LIVE_BACKENDS backends (written as the reconciler would), each
/// like a flow the datapath opened and established there, freshly stamped. Flow n's
/// client is the wrapper's source of run n from `clients`, so the cycling cases reach them.
fn add_live_flows(fx: &mut Fixture, bench: &mut Bench, clients: Ipv4Addr) -> Result<()> {
    let started = Instant::now();
    let frontend = SocketAddrV4::new(NODE, LIVE_FRONTEND_PORT);
    let addrs: Vec<SocketAddrV4> = (0..LIVE_BACKENDS).map(|i| SocketAddrV4::new(live_backend(i), 8080)).collect();
    let mut writer = ServiceWriter::open(fx)?;
    let like = ServiceKey::new(NODE, 30080, IPPROTO_TCP);
    let backends = writer.add(ServiceKey::new(NODE, LIVE_FRONTEND_PORT, IPPROTO_TCP), like, &addrs)?;
    writer.finish()?;
    // The template: a flow the datapath opened and established, then removed (through the
    // datapath's reaper) so its NAT port is free.
    let first = SocketAddrV4::new(CLIENT, 40001);
    let template = handshake(fx, first, frontend)?;
    ensure!(template.snat(), "NodePort flows to a remote backend take a NAT port");
    ensure!(Conntrack::open(&fx.pin_dir)?.remove(&[template.forward.0])? == 1, "removing the template flow");
    let (lo, _) = fx.setup.snat_ports;
    let mut rng = SplitMix64(SEED);
    let now = ct_now();
    let flows = (0..LIVE_FLOWS).map(|n| {
        let b = (n % LIVE_BACKENDS) as usize;
        // Each backend's flows take its NAT ports in turn.
        let nat_port = lo + (n / LIVE_BACKENDS) as u16;
        let (id, backend) = backends[b];
        template.to_backend(id, backend).like(wrapper_source(clients, n), nat_port, rng.nonce(), now)
    });
    let added = insert_flows(fx, bench, flows)?;
    // Plus the established flow's two halves.
    let counted = bench.ct_entries()?;
    ensure!(counted == added + 2, "LB_CT_STATE counts {counted} conntrack entries, expected {}", added + 2);
    let live: u64 = backends.iter().map(|(id, _)| fx.backend_live(*id)).sum();
    ensure!(live == LIVE_FLOWS as u64, "LB_BE_LIVE counts {live} open flows to the live backends");
    println!(
        "1M live flows: {counted} conntrack entries ({} flows), inserted in {:.1} s",
        counted / 2,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The i-th of many distinct clients from `base`: 50 000 ports per address.
fn client(base: Ipv4Addr, i: u32) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from(base) + i / 50_000), (10_000 + i % 50_000) as u16)
}

/// New flows are never refused for room or ports: conntrack's admission limit and capacity
/// hold every flow all rounds create, and the SNAT range has a port for each SNAT flow.
fn check_capacity(fixture: usize, fx: &Fixture, bench: &Bench, cases: &[Case], rounds: usize) -> Result<()> {
    let new_flows = |snat: bool| -> u64 {
        cases
            .iter()
            .filter(|c| c.fixture == fixture && c.sources == Sources::New)
            .filter(|c| matches!(c.expect.out, Out::Translated { snat: s, .. } if s == snat))
            .map(|c| c.repeat as u64 * rounds as u64)
            .sum()
    };
    let entries = bench.ct_entries()? + 2 * (new_flows(true) + new_flows(false));
    let room = fx.setup.admit_limit.min(fx.setup.conntrack_entries) as u64;
    ensure!(entries <= room, "the new-flow cases need {entries} conntrack entries, the fixture admits {room}");
    let (lo, hi) = fx.setup.snat_ports;
    // The established flow holds one port.
    let ports = new_flows(true) + 1;
    ensure!(ports <= (hi - lo) as u64 + 1, "the new SNAT flows need {ports} ports, the range {lo}-{hi} has fewer");
    println!("room: the new-flow cases end with {entries} conntrack entries (admitted up to {room}) and {ports} SNAT ports ({lo}-{hi})");
    Ok(())
}

/// Checks a passing case's packet against the datapath's screening: the frontend filter
/// (LB_FRONT_BITS), the reply destinations LB_CONFIG names, and LB_CONNTRACK.
fn check_screen(fx: &Fixture, case: &Case) -> Result<(), String> {
    if case.screen == Screen::Any {
        return Ok(());
    }
    let facts = || -> Result<(bool, bool, bool)> {
        let config: Array<_, Config> = Array::try_from(datapath::open_map(&fx.pin_dir, map_names::CONFIG)?)?;
        let config = config.get(&0, 0)?;
        let filter: Array<_, u64> = Array::try_from(datapath::open_map(&fx.pin_dir, map_names::FRONT_BITS)?)?;
        let dst = case.frame.dst;
        let (addr, port) = (addr_be(*dst.ip()), dst.port());
        let bit = front_filter_bit(addr, port.to_be());
        let maybe_front = filter.get(&(bit / 64), 0)? & (1 << (bit % 64)) != 0;
        let to_snat_range =
            addr == config.node_addr_be && (config.snat_port_min..=config.snat_port_max).contains(&port);
        let may_be_reply = to_snat_range || in_prefix(addr, config.pods_addr_be, config.pods_prefix_len);
        let tracked = fx.half(&ct_key(case.frame.src, dst, case.frame.proto)).is_some();
        Ok((maybe_front, may_be_reply, tracked))
    };
    let dst = case.frame.dst;
    match (case.screen, facts().map_err(|e| format!("reading the maps: {e:#}"))?) {
        (_, (true, _, _)) => Err(format!("the frontend filter's bit for {dst} is set: it pays a service lookup too")),
        (Screen::SkipsConntrack, (_, true, _)) => Err(format!("{dst} may be a reply: it pays a conntrack lookup")),
        (Screen::MissesConntrack, (_, false, _)) => Err(format!("{dst} cannot be a reply: conntrack is skipped")),
        (Screen::MissesConntrack, (_, _, true)) => Err(format!("a flow to {dst} is tracked: the lookup hits")),
        _ => Ok(()),
    }
}

/// Does a call's outcome match what its case says? Ok: a line saying what it showed.
fn verify(case: &Case, o: &Outcome, first_run: u32, fx: &Fixture) -> Result<String, String> {
    let e = &case.expect;
    let runs = case.repeat as u64;
    if o.action != e.action {
        return Err(format!("{}, expected {}", action_name(o.action), action_name(e.action)));
    }
    if let Some((label, delta)) = o.counters.iter().find(|(label, _)| !e.counters.contains(label)) {
        return Err(format!("{label} +{delta}, expected +0"));
    }
    for label in e.counters {
        let delta = o.counters.get(label).copied().unwrap_or(0);
        if delta != runs {
            return Err(format!("{label} +{delta}, expected +{runs} (one per run)"));
        }
    }
    let entries = e.entries_per_run * runs as i64;
    if o.ct_entries != entries {
        return Err(format!("conntrack entries {:+}, expected {entries:+}", o.ct_entries));
    }
    if case.sources.varied() && o.runs != first_run + case.repeat {
        return Err(format!("the wrapper's run counter went {first_run} -> {}, expected +{runs}", o.runs));
    }
    if o.meta.map(|m| m.tag) != e.tag {
        return Err(format!("hand-over tag {:x?}, expected {:x?}", o.meta.map(|m| m.tag), e.tag));
    }
    let frame = match e.out {
        Out::Unchanged if o.out == case.frame.bytes() => "frame unchanged".to_string(),
        Out::Unchanged => return Err("the frame came out changed".into()),
        Out::Translated { ref dst, snat } => {
            let (src, out_dst) = endpoints(&o.out);
            let (lo, hi) = fx.setup.snat_ports;
            // The last run's own source: the wrapper's, when it gives each run its own.
            let own =
                if case.sources.varied() { wrapper_source(*case.frame.src.ip(), o.runs - 1) } else { case.frame.src };
            let src_ok = if snat { *src.ip() == NODE && (lo..=hi).contains(&src.port()) } else { src == own };
            if !dst.contains(&out_dst) || !src_ok || !checksums_ok(&o.out) {
                let from = if snat { format!("{NODE}:{lo}-{hi}") } else { own.to_string() };
                return Err(format!("out {src} -> {out_dst}, expected {from} -> one of {dst:?} with valid checksums"));
            }
            format!("out {src} -> {out_dst} (last run), checksums valid")
        }
    };
    let grew = if e.counters.is_empty() {
        "no counter moved".to_string()
    } else {
        format!("{} +{runs} each, others +0", e.counters.join(", "))
    };
    let tag = match e.tag {
        Some(XDP_META_MARK) => " + hand-over to tc egress",
        Some(XDP_META_REDIRECT) => " + hand-over to tc redirect",
        _ => "",
    };
    let mut proof = format!("{}{tag}, {frame}; {grew}; conntrack entries {:+}", action_name(o.action), o.ct_entries);
    match case.sources {
        Sources::New => proof += &format!("; wrapper runs {first_run}..{} (a new 5-tuple each)", o.runs),
        Sources::Cycle { .. } => proof += &format!("; wrapper runs {first_run}..{} (another live flow each)", o.runs),
        Sources::Fixed => {}
    }
    Ok(proof)
}

fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown action",
    }
}

fn print_table(cases: &[Case], rows: &[Row], rounds: usize) {
    println!("XDP per-packet cost, ns per packet: BPF_PROG_TEST_RUN, {rounds} interleaved rounds (the kernel's time per run, whole ns)");
    println!("own: minus the floor's same statistic; x empty: (empty program + own median) / empty program median");
    println!(
        "{:<46} {:>9} {:>6} {:>6} {:>8} {:>8} {:>7}  {:<28} verdict",
        "case", "runs/call", "best", "median", "own best", "own med", "x empty", "target"
    );
    // The first two cases are the empty program and the floor; no other row means much without them.
    let (empty, floor) = (&rows[0], &rows[1]);
    let units = empty.standing.refused.is_none() && floor.standing.refused.is_none();
    let own = |row: &Row| (row.best() as i64 - floor.best() as i64, row.median() as i64 - floor.median() as i64);
    for (i, (case, row)) in cases.iter().zip(rows).enumerate() {
        if let Some(why) = &row.standing.refused {
            println!("{:<46} {}, {why}", case.name, if row.standing.unmeasured { "NOT MEASURED" } else { "REFUSED" });
            continue;
        }
        let (own_best, own_median, x_empty) = match i {
            0 => ("-".into(), "-".into(), "1.00".into()),
            1 if units => ("-".into(), "-".into(), format!("{:.2}", floor.median() as f64 / empty.median() as f64)),
            _ if units => {
                let (b, m) = own(row);
                (
                    b.to_string(),
                    m.to_string(),
                    format!("{:.2}", (empty.median() as i64 + m) as f64 / empty.median() as f64),
                )
            }
            _ => ("?".into(), "?".into(), "?".into()),
        };
        let (target, verdict) = match case.goal {
            Goal::None => (String::new(), String::new()),
            _ if !units => ("no floor to judge by".into(), String::new()),
            Goal::OwnAtMost { ns, katran } => {
                let (b, m) = own(row);
                (format!("<= {ns} ns (Katran {katran})"), verdict(m as f64 <= ns as f64, b as f64 <= ns as f64))
            }
            Goal::Compare { of, label } => match cases.iter().position(|c| c.name == of) {
                Some(base) if rows[base].standing.refused.is_none() => {
                    (format!("{:.2}x {label}", own(row).1 as f64 / own(&rows[base]).1 as f64), String::new())
                }
                _ => (String::new(), String::new()),
            },
            Goal::RatioAtMost { of, ratio } => match cases.iter().position(|c| c.name == of) {
                None => ("its base row did not run".into(), String::new()),
                Some(base) if rows[base].standing.refused.is_some() => {
                    ("its base row was refused".into(), String::new())
                }
                Some(base) => {
                    let ((b, m), (base_b, base_m)) = (own(row), own(&rows[base]));
                    let (rb, rm) = (b as f64 / base_b as f64, m as f64 / base_m as f64);
                    (format!("<= {ratio}x established: {rm:.2}x"), verdict(rm <= ratio, rb <= ratio))
                }
            },
        };
        println!(
            "{:<46} {:>9} {:>6} {:>6} {:>8} {:>8} {:>7}  {:<28} {}",
            case.name,
            case.repeat,
            row.best(),
            row.median(),
            own_best,
            own_median,
            x_empty,
            target,
            verdict
        );
    }
    println!("\nwhat every call of each row showed (checked after each of the {rounds} rounds):");
    for (case, row) in cases.iter().zip(rows).filter(|(_, r)| r.standing.refused.is_none()) {
        println!("  {}: {}", case.name, row.standing.proof);
    }
}

/// Met by the median; by the best round only; or missed.
fn verdict(median: bool, best: bool) -> String {
    match (median, best) {
        (true, _) => "met",
        (false, true) => "met by the best round only",
        _ => "MISSED",
    }
    .into()
}

/// The sizes of the programs timed, as bpftool shows them.
fn print_programs(fx: &mut Fixture) -> Result<()> {
    println!();
    for name in [program_names::XDP_UPLINK, program_names::BENCH_RESTORE, program_names::XDP_PASS] {
        let program: &Xdp = fx.dp.ebpf_mut().program(name).context(name)?.try_into()?;
        let info: ProgramInfo = program.info()?;
        let xlated = info.size_translated().unwrap_or(0);
        println!(
            "{name}: {} instructions after the verifier ({xlated} bytes xlated), {} bytes JITed, {} instructions verified",
            xlated / 8,
            info.size_jitted(),
            info.verified_instruction_count().unwrap_or(0)
        );
    }
    Ok(())
}

/// With 90% of the SNAT range toward one backend taken at random ports (flows put
/// straight into conntrack), starts new SNAT flows to that backend and counts how many get
/// a port. Each batch's flows are removed after it (through the datapath's reaper), so
/// the range stays within a point of 90% taken throughout.
fn nat_port_allocation(fx: &mut Fixture) -> Result<()> {
    let mut bench = Bench::new(fx)?;
    let frontend = SocketAddrV4::new(NODE, 30080);
    let (lo, hi) = fx.setup.snat_ports;
    let span = (hi - lo) as u32 + 1;
    let first = SocketAddrV4::new(CLIENT, 40000);
    let key = ct_key(first, frontend, IPPROTO_TCP);
    fx.xdp(&Frame::tcp(first, frontend, SYN).bytes());
    let template = Flow::read(fx, key)?;
    ensure!(template.snat(), "NodePort flows to the remote backend take a NAT port");
    let mut conntrack = Conntrack::open(&fx.pin_dir)?;
    ensure!(conntrack.remove(&[key])? == 1 && bench.ct_entries()? == 0, "removing the template flow");

    let mut rng = SplitMix64(SEED);
    let mut ports: Vec<u16> = (lo..=hi).collect();
    rng.shuffle(&mut ports);
    let taken = span * NAT_TAKEN_PERCENT / 100;
    let now = ct_now();
    let flows = ports[..taken as usize]
        .iter()
        .enumerate()
        .map(|(i, port)| template.like(client(Ipv4Addr::new(172, 18, 0, 0), i as u32), *port, rng.nonce(), now));
    ensure!(insert_flows(fx, &mut bench, flows)? == 2 * taken as u64, "a flow for every port taken");

    let frame = Frame::tcp(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 1024), frontend, SYN);
    let frame = clear_of_partial_lookalikes(&frame, NAT_FLOWS)?;
    let base = *frame.src.ip();
    let frame = frame.bytes();
    let (mut claimed, mut exhausted, mut ns, mut next) = (0, 0, Vec::new(), 0);
    for _ in 0..NAT_FLOWS / NAT_BATCH {
        let call = Call {
            program: Program::Wrapped(program_names::XDP_UPLINK),
            frame: &frame,
            new_flows_from: Some(next),
            repeat: NAT_BATCH,
        };
        let o = bench.time(fx, &call)?;
        let count = |label| o.counters.get(label).copied().unwrap_or(0);
        let (new, refused) = (count("new_flow"), count("drop_nat_exhausted"));
        let expected = ["new_flow", "xdp_tx", "drop_nat_exhausted"];
        ensure!(
            o.counters.keys().all(|l| expected.contains(l))
                && new + refused == NAT_BATCH as u64
                && count("xdp_tx") == new
                && o.ct_entries == 2 * new as i64
                && o.runs == next + NAT_BATCH,
            "NAT port allocation: the counters disagree with {NAT_BATCH} new SNAT flows: {:?}, conntrack entries {:+}, runs {next}..{}",
            o.counters,
            o.ct_entries,
            o.runs
        );
        let keys: Vec<_> = (next..o.runs).map(|n| ct_key(wrapper_source(base, n), frontend, IPPROTO_TCP)).collect();
        let removed = conntrack.remove(&keys)? as u64;
        ensure!(removed == new, "removed {removed} of the batch's {new} flows");
        (claimed, exhausted, next) = (claimed + new, exhausted + refused, o.runs);
        ns.push(o.ns_per_run);
    }
    ns.sort_unstable();
    let rate = 100.0 * claimed as f64 / (claimed + exhausted) as f64;
    println!(
        "\n{NAT_TEST}, {taken} of the {span} ports {lo}-{hi} toward {REMOTE_POD}:8080 taken ({NAT_TAKEN_PERCENT}%, at random), \
         {} new SNAT flows in batches of {NAT_BATCH}:",
        claimed + exhausted
    );
    println!(
        "  {claimed} got a port (new_flow), {exhausted} did not (drop_nat_exhausted): {rate:.3}%; target >= {NAT_TARGET}%: {}",
        if rate >= NAT_TARGET { "met" } else { "MISSED" }
    );
    println!("  a new SNAT flow at this occupancy: median {} ns per run, wrapper included", ns[ns.len() / 2]);
    Ok(())
}

/// Backend selection's figures: Maglev shares and disruption, read from the tables the
/// kernel reads; and how new flows from as many clients spread over the backends under each
/// algorithm, counted by the datapath's per-backend counters. False when a count disagrees
/// with what the algorithm guarantees.
fn selection_figures(fx: &mut Fixture) -> Result<bool> {
    let wide = maglev_wide_backends();
    fx.apply(&selection_manifests(&wide));
    println!("\nBackend selection (fixture maps and counters; no timing)");
    let mut ok = true;
    for (port, n) in [(ALGORITHMS[2].node_port, 5), (MAGLEV_WIDE_PORT, MAGLEV_WIDE)] {
        let table = maglev_table(fx, port)?;
        let even = table.len() as f64 / n as f64;
        let mut shares: BTreeMap<SocketAddrV4, usize> = BTreeMap::new();
        table.iter().for_each(|b| *shares.entry(*b).or_default() += 1);
        let worst = shares.values().map(|s| (*s as f64 - even).abs() / even * 100.0).fold(0.0, f64::max);
        let met = shares.len() == n && worst <= 1.0;
        ok &= met;
        let (lo, hi) = (shares.values().min().unwrap_or(&0), shares.values().max().unwrap_or(&0));
        println!(
            "  maglev, {n} backends: {} positions, {lo}..{hi} each (even {even:.1}), at most {worst:.2}% off even; target <= 1%: {}",
            table.len(),
            if met { "met" } else { "MISSED" }
        );
    }
    let before = maglev_table(fx, MAGLEV_WIDE_PORT)?;
    let removed = wide[3];
    let fewer: Vec<SocketAddrV4> = wide.iter().copied().filter(|b| *b != removed).collect();
    fx.apply(&selection_manifests(&fewer));
    let after = maglev_table(fx, MAGLEV_WIDE_PORT)?;
    ensure!(before.len() == after.len(), "the Maglev table changed size with one backend less");
    let m = before.len() as f64;
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64;
    let theirs = before.iter().filter(|b| **b == removed).count() as f64;
    let share = moved / m;
    let met = share <= 1.5 / MAGLEV_WIDE as f64;
    ok &= met;
    println!(
        "  maglev, 1 of {MAGLEV_WIDE} backends removed: {:.1}% of flows moved (1/N = {:.1}%): the removed backend's {:.1}%, others {:.1}%; about 1/N: {}",
        share * 100.0,
        100.0 / MAGLEV_WIDE as f64,
        theirs / m * 100.0,
        (moved - theirs) / m * 100.0,
        if met { "met" } else { "MISSED" }
    );
    for (a, algorithm) in ALGORITHMS.iter().enumerate() {
        let backends = selection_backends(a);
        let ids = backend_ids(fx, &backends)?;
        let before: Vec<u64> = ids.iter().map(|id| fx.backend_stats(*id).new_flows).collect();
        let front = SocketAddrV4::new(NODE, algorithm.node_port);
        // Each flow from a client of its own (source-hash and affinity decide by address).
        for n in 0..SPREAD_FLOWS {
            let client = SocketAddrV4::new(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 40 + a as u8, 0, 1)) + n), 1024);
            fx.xdp(&Frame::tcp(client, front, SYN).bytes());
        }
        let counts: Vec<u64> = ids.iter().zip(&before).map(|(id, b)| fx.backend_stats(*id).new_flows - b).collect();
        let even = SPREAD_FLOWS as f64 / backends.len() as f64;
        let worst = counts.iter().map(|c| (*c as f64 - even).abs() / even * 100.0).fold(0.0, f64::max);
        // Round-robin and least-conn (no flow closes) spread exactly; the hashes and random
        // reach every backend.
        let exact = ["round-robin", "least-conn"].contains(&algorithm.annotation) && !algorithm.affinity;
        let all_counted = counts.iter().sum::<u64>() == SPREAD_FLOWS as u64;
        let fair = if exact { counts.iter().all(|c| *c as f64 == even) } else { counts.iter().all(|c| *c > 0) };
        ok &= all_counted && fair;
        let name = algorithm.new_flow.trim_start_matches("new flow, 5 backends: ");
        println!(
            "  {name}: {SPREAD_FLOWS} new flows from as many clients: {counts:?} per backend, at most {worst:.1}% off even{}",
            match (all_counted, exact, fair) {
                (false, _, _) => " -- COUNTERS DISAGREE: not every new flow was counted on a backend",
                (true, true, true) => " (exactly even, as it must be)",
                (true, true, false) => " -- NOT EVEN",
                (true, false, false) => " -- a backend got nothing",
                (true, false, true) => "",
            }
        );
    }
    println!("  least-conn with connections held open: tests/tests/lab_selection.rs (a new connection goes to the emptiest backend)");
    Ok(ok)
}

/// The Maglev table of the NodePort `port` (TCP) as the kernel reads it: each position's
/// backend.
fn maglev_table(fx: &Fixture, port: u16) -> Result<Vec<SocketAddrV4>> {
    let services: aya::maps::HashMap<_, ServiceKey, lb_common::ServiceValue> =
        datapath::open_map(&fx.pin_dir, map_names::SERVICES)?.try_into()?;
    let slots: aya::maps::HashMap<_, lb_common::SlotKey, u32> =
        datapath::open_map(&fx.pin_dir, map_names::SLOTS)?.try_into()?;
    let svc = services.get(&ServiceKey::new(NODE, port, IPPROTO_TCP), 0)?;
    (0..svc.count[0] as u32)
        .map(|pos| {
            let id = slots.get(&lb_common::SlotKey::new(svc.svc_id, svc.gen, 0, pos), 0)?;
            let b = fx.backend(id).context("a slot names a missing backend")?;
            Ok(SocketAddrV4::new(lb_common::user::ip_from_be(b.addr_be), u16::from_be(b.port_be)))
        })
        .collect()
}

/// The backend ids of these addresses (each in one Service only).
fn backend_ids(fx: &Fixture, addrs: &[SocketAddrV4]) -> Result<Vec<u32>> {
    let backends: Array<_, lb_common::Backend> = datapath::open_map(&fx.pin_dir, map_names::BACKENDS)?.try_into()?;
    addrs
        .iter()
        .map(|a| {
            (1..fx.setup.backends)
                .find(|id| {
                    backends.get(id, 0).is_ok_and(|b| b.addr_be == addr_be(*a.ip()) && b.port_be == a.port().to_be())
                })
                .with_context(|| format!("no backend id for {a}"))
        })
        .collect()
}
