//! End-to-end cost of reaching a backend through a Service, and the time of the agent's
//! conntrack sweep over 1M entries (BENCHMARKS.md has the method and results).
//!
//! Requests: a lab of two nodes, client pods on node1, the backend (an echo pod) on node2, a
//! ClusterIP Service whose only endpoint is that pod. Clients are processes of their own
//! (lab-client) in a client pod's namespace or node1's, and reach the backend three ways:
//! - direct: the backend pod's own address, no Service;
//! - ClusterIP, socket-LB off: the process is in a cgroup without the socket hooks, so tc
//!   translates its packets one by one (DNAT on the way in, the reverse on the way back);
//! - ClusterIP, socket-LB on: the process is in the cgroup node1's agent attached the hooks
//!   to (`--socket-lb all --cgroup-root`), so connect() is translated once.
//!
//! Both cgroups are the benchmark's own. The exchanges: keep-alive TCP (small requests on one
//! connection), a new TCP connection per request, and UDP datagrams on one connected socket.
//! Rounds interleave the cases, each round starting one case later; rates and latencies are
//! reported as best and median rounds, next to the direct path's of the same round.
//!
//! Every call proves which path it measured by the datapath's own counters on both nodes:
//! socket-LB on, sock_connect rose by one per connection and no per-packet translation
//! counter moved; socket-LB off, new_flow rose by one per connection, sock_connect did not,
//! and per-packet translations at least matched the requests; direct, neither moved. A row
//! whose counters disagree in any round is not printed (why is) and the run fails; a row
//! the machine could not measure (no request finished in its window) is shown as NOT
//! MEASURED and does not fail it.
//!
//! Sweep: a fixture's LB_CONNTRACK is filled straight with 1M entries (500k flows made like
//! one the datapath opened, realistically stamped: established ones seen within the last
//! minute, closed ones and unanswered SYNs expired 11-60 s ago), and the agent's
//! `Conntrack::sweep` is timed: reading the table (BPF_MAP_LOOKUP_BATCH) and reaping the dead
//! through the kernel's reaper. Each round plants the expired flows again; the flows removed
//! must equal those planted, and the entry and open-flow counts must come out right.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_common::{
    conntrack::{bits, secs},
    counters, ServiceKey, IPPROTO_TCP,
};
use lb_tests::{
    bench::{ct_now, handshake, insert_flows, machine, Bench, Flow, Refusal, ServiceWriter, SplitMix64, Standing},
    cgroup::Cgroup,
    client,
    cluster::{Cluster, Manifests, BACKEND_PORT},
    fixture::{with_fixture, Fixture, Setup, CLIENT, NODE, REMOTE_POD},
    lab::Spec,
    traffic::RrStats,
};
use lb_user::datapath::conntrack::Conntrack;

/// The ClusterIP; its one endpoint is BACKEND, the pod of node2.
const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 7, 1), 80);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 10), BACKEND_PORT);

const ROUNDS: usize = 5;
/// How long each call of a case exchanges requests.
const SECONDS: f64 = 2.0;
/// Flows in the sweep's table (two entries each), and the share planted expired.
const SWEEP_FLOWS: u32 = 500_000;
const EXPIRED_EVERY: u32 = 4;
/// The sweep's flows go through this NodePort to this many backends, enough for each flow
/// its own NAT port (a backend has at most the range's 64 512).
const SWEEP_FRONTEND_PORT: u16 = 30090;
const SWEEP_BACKENDS: u32 = 17;
/// `--smoke`: one short round and a small table, to show the benchmark works.
const SMOKE_SECONDS: f64 = 0.3;
const SMOKE_SWEEP_FLOWS: u32 = 10_000;
/// Seeds the sweep's random choices (nonces, ages), so a run can be repeated.
const SEED: u64 = 0x7377_6565_702d_6374;
/// What `--only` matches to run the sweep.
const SWEEP: &str = "sweep";

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench_e2e: some results were refused (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench_e2e: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `bench_e2e [--smoke] [--rounds N] [--seconds S] [--only TEXT]`.
#[derive(Clone)]
struct Options {
    rounds: usize,
    seconds: f64,
    sweep_flows: u32,
    only: Option<String>,
}

impl Options {
    fn parse() -> Result<Options> {
        let mut options = Options { rounds: ROUNDS, seconds: SECONDS, sweep_flows: SWEEP_FLOWS, only: None };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--smoke" => {
                    (options.rounds, options.seconds, options.sweep_flows) = (1, SMOKE_SECONDS, SMOKE_SWEEP_FLOWS)
                }
                "--rounds" => options.rounds = value()?.parse().context("--rounds")?,
                "--seconds" => options.seconds = value()?.parse().context("--seconds")?,
                "--only" => options.only = Some(value()?),
                _ => anyhow::bail!(
                    "unknown argument {arg}; usage: bench_e2e [--smoke] [--rounds N] [--seconds S] [--only TEXT] \
                     (TEXT in a case's name, or \"{SWEEP}\")"
                ),
            }
        }
        ensure!(options.rounds > 0, "--rounds must be at least 1");
        ensure!(options.seconds > 0.0, "--seconds must be more than 0");
        Ok(options)
    }

    fn selects(&self, name: &str) -> bool {
        self.only.as_ref().is_none_or(|text| name.contains(text.as_str()))
    }
}

fn run() -> Result<bool> {
    let options = Options::parse()?;
    println!("{}", machine());
    // The sweep's user-space part (copying entries out, finding the dead) runs as this binary
    // was built; the agent ships optimised.
    println!("build: {}", if cfg!(debug_assertions) { "debug (unoptimised)" } else { "release" });
    let cases: Vec<Case> = Case::all().into_iter().filter(|c| options.selects(&c.name())).collect();
    let requests = cases.is_empty() || requests(&cases, &options)?;
    let sweep = !options.selects(SWEEP) || conntrack_sweep(&options)?;
    Ok(requests && sweep)
}

/// Who the client is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    /// A pod on node1 (one per route, see [`Route`]).
    Pod,
    /// node1's own namespace (a host-network process).
    Node,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exchange {
    KeepAlive,
    Connect,
    Udp,
}

/// How the client reaches the backend. A pod client is a pod of its own for each route
/// (node1's pods in this order, on identical veths): one route's flows then never share a
/// client port toward the backend with another's: a per-packet flow's reply half lives on
/// for the 10 s close timeout and rewrites the answers of a direct or socket-level
/// connection that reuses its client port (its SYN-ACK comes from the ClusterIP, and the
/// client resets it), which BENCHMARKS.md reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Direct = 0,
    PerPacket = 1,
    Socket = 2,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    from: Who,
    exchange: Exchange,
    route: Route,
}

impl Case {
    /// Pod clients every way; node clients over TCP, direct and with socket-LB (a node's own
    /// sockets meet no packet hook, so without socket-LB it has no ClusterIP at all).
    fn all() -> Vec<Case> {
        let mut cases = Vec::new();
        for (from, exchanges) in [
            (Who::Pod, &[Exchange::KeepAlive, Exchange::Connect, Exchange::Udp][..]),
            (Who::Node, &[Exchange::KeepAlive, Exchange::Connect]),
        ] {
            for exchange in exchanges {
                for route in [Route::Direct, Route::PerPacket, Route::Socket] {
                    if !(from == Who::Node && route == Route::PerPacket) {
                        cases.push(Case { from, exchange: *exchange, route });
                    }
                }
            }
        }
        cases
    }

    fn name(&self) -> String {
        let from = match self.from {
            Who::Pod => "pod",
            Who::Node => "node",
        };
        let exchange = match self.exchange {
            Exchange::KeepAlive => "TCP keep-alive",
            Exchange::Connect => "TCP conn/request",
            Exchange::Udp => "UDP",
        };
        let route = match self.route {
            Route::Direct => "direct",
            Route::PerPacket => "ClusterIP, socket-LB off",
            Route::Socket => "ClusterIP, socket-LB on",
        };
        format!("{from}, {exchange}: {route}")
    }

    /// lab-client's mode.
    fn mode(&self) -> &'static str {
        match self.exchange {
            Exchange::KeepAlive => "rr-keepalive",
            Exchange::Connect => "rr-connect",
            Exchange::Udp => "rr-udp",
        }
    }

    /// What the rate counts.
    fn unit(&self) -> &'static str {
        match self.exchange {
            Exchange::Connect => "conn/s",
            _ => "req/s",
        }
    }

    fn destination(&self) -> SocketAddrV4 {
        match self.route {
            Route::Direct => BACKEND,
            _ => SERVICE,
        }
    }

    /// Connections (connected sockets) a call made.
    fn connections(&self, stats: &RrStats) -> u64 {
        match self.exchange {
            Exchange::Connect => stats.requests,
            _ => 1,
        }
    }

    /// The direct case this one is compared with.
    fn direct(&self) -> Case {
        Case { route: Route::Direct, ..*self }
    }
}

/// What a row's claim is about, summed over both nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    new_flow: u64,
    /// Per-packet translations of known flows: established, reply, and egress rewrites.
    per_packet: u64,
    /// Of those, the requests' (established) and the answers' (reply) own translations.
    established: u64,
    reply: u64,
    sock_connect: u64,
    sock_sendmsg: u64,
}

/// Every datapath counter of every node (LB_COUNTERS summed over CPUs), by node and index;
/// or how much each grew.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snapshot(Vec<Vec<u64>>);

impl Snapshot {
    fn read(cluster: &Cluster) -> Result<Snapshot> {
        let nodes = cluster.agents.iter().map(|agent| {
            Ok(lb_user::datapath::read_counters(&agent.pin_dir)?.iter().map(|(_, c)| c.packets).collect())
        });
        Ok(Snapshot(nodes.collect::<Result<_>>()?))
    }

    /// The counters once they stop moving: the last packets of a call (a connection's
    /// close) may still be on their way when its client exits. Bounded: None if they never
    /// stopped within it (a busy machine), so the call measures nothing.
    fn settled(cluster: &Cluster) -> Result<Option<Snapshot>> {
        let mut last = Snapshot::read(cluster)?;
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(30));
            let now = Snapshot::read(cluster)?;
            if now == last {
                return Ok(Some(last));
            }
            last = now;
        }
        Ok(None)
    }

    fn since(&self, before: &Snapshot) -> Snapshot {
        let nodes = self.0.iter().zip(&before.0);
        Snapshot(nodes.map(|(after, before)| after.iter().zip(before).map(|(a, b)| a - b).collect()).collect())
    }

    /// The sums a row's claim is about, over both nodes.
    fn counts(&self) -> Counts {
        let get = |index: u32| self.0.iter().map(|node| node[index as usize]).sum::<u64>();
        Counts {
            new_flow: get(counters::NEW_FLOW),
            per_packet: get(counters::ESTABLISHED) + get(counters::REPLY) + get(counters::EGRESS_REWRITTEN),
            established: get(counters::ESTABLISHED),
            reply: get(counters::REPLY),
            sock_connect: get(counters::SOCK_CONNECT),
            sock_sendmsg: get(counters::SOCK_SENDMSG),
        }
    }

    /// Every counter that moved, by node (for a refusal's reason).
    fn moved(&self) -> String {
        let mut shown = Vec::new();
        for (i, node) in self.0.iter().enumerate() {
            for (index, label) in counters::ALL {
                if node[index as usize] != 0 {
                    shown.push(format!("node{} {label} +{}", i + 1, node[index as usize]));
                }
            }
        }
        shown.join(", ")
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "new_flow +{}, established/reply/egress_rewritten +{}, sock_connect +{}, sock_sendmsg +{}",
            self.new_flow, self.per_packet, self.sock_connect, self.sock_sendmsg
        )
    }
}

/// Does what the datapath counted during a call match the row's route?
fn verify(case: &Case, stats: &RrStats, moved: &Snapshot) -> Result<String, Refusal> {
    let grew = &moved.counts();
    if stats.errors > 0 {
        return Err(Refusal::Disagrees(format!(
            "{} of {} requests failed; all that moved: {}",
            stats.errors,
            stats.errors + stats.requests,
            moved.moved()
        )));
    }
    if stats.requests == 0 {
        return Err(Refusal::Unmeasured(format!("no request finished in {:.2} s", stats.seconds)));
    }
    let connections = case.connections(stats);
    let agrees = match case.route {
        Route::Direct => *grew == Counts::default(),
        Route::PerPacket => {
            // Both directions of every request: the request by its flow's forward half (a
            // flow's first request, for UDP, by starting it),
            // the answer by its reply half.
            grew.new_flow == connections
                && grew.established + grew.new_flow >= stats.requests
                && grew.reply >= stats.requests
                && (grew.sock_connect, grew.sock_sendmsg) == (0, 0)
        }
        Route::Socket => {
            grew.sock_connect == connections && (grew.new_flow, grew.per_packet, grew.sock_sendmsg) == (0, 0, 0)
        }
    };
    let what = format!("{grew} for {connections} connection(s), {} requests", stats.requests);
    if agrees {
        Ok(what)
    } else {
        let expected = match case.route {
            Route::Direct => "nothing translated",
            Route::PerPacket => {
                "new_flow + connections, established (or new_flow) and reply each >= requests, no socket hook"
            }
            Route::Socket => "sock_connect + connections and no per-packet translation",
        };
        Err(Refusal::Disagrees(format!("{what}; expected {expected}; all that moved: {}", moved.moved())))
    }
}

/// A case's samples, or why it has none to show.
#[derive(Default)]
struct Row {
    samples: Vec<RrStats>,
    standing: Standing,
}

impl Row {
    fn rates(&self) -> Vec<f64> {
        let mut r: Vec<f64> = self.samples.iter().map(RrStats::per_second).collect();
        r.sort_by(f64::total_cmp);
        r
    }
    fn best_rate(&self) -> f64 {
        *self.rates().last().expect("samples")
    }
    fn median_rate(&self) -> f64 {
        let r = self.rates();
        r[r.len() / 2]
    }
    /// The median round's value of a latency.
    fn median_of(&self, of: impl Fn(&RrStats) -> u64) -> u64 {
        let mut v: Vec<u64> = self.samples.iter().map(of).collect();
        v.sort_unstable();
        v[v.len() / 2]
    }
}

/// The lab for the request cases: the cluster, and the benchmark's two cgroups (node1's
/// agent attaches the socket hooks to `hooked`; `plain` has none). Drops the cluster (its
/// agents unload their pins) before the cgroups.
struct RequestLab {
    cluster: Cluster,
    hooked: Cgroup,
    plain: Cgroup,
}

impl RequestLab {
    fn start() -> Result<RequestLab> {
        lb_tests::require_root();
        let hooked = Cgroup::new("lbt", "bench-hooked")?;
        let plain = Cgroup::new("lbt", "bench-plain")?;
        let spec = Spec { pods_per_node: vec![3, 1], clients: 0, ..Spec::default() };
        let hooks = hooked.path.display().to_string();
        let cluster = Cluster::start_each("lbt", &spec, Manifests::inline(&manifest())?, |i| {
            if i == 0 {
                ["--socket-lb", "all", "--cgroup-root", &hooks].map(String::from).to_vec()
            } else {
                Vec::new()
            }
        })?;
        let log = cluster.agents[0].log_text();
        ensure!(log.contains("socket hooks attached"), "node1's agent did not attach the socket hooks:\n{log}");
        ensure!(!log.contains("WARN"), "node1's agent warned about the benchmark's manifest:\n{log}");
        Ok(RequestLab { cluster, hooked, plain })
    }

    /// One call of `case`: lab-client exchanging requests for `seconds`.
    fn call(&self, case: &Case, seconds: f64) -> Result<RrStats> {
        let node1 = &self.cluster.lab.nodes[0];
        let ns = match case.from {
            Who::Pod => &node1.pods[case.route as usize].ns.name,
            Who::Node => &node1.ns.name,
        };
        let cgroup: &Path = if case.route == Route::Socket { &self.hooked.path } else { &self.plain.path };
        let args = [case.mode(), &case.destination().to_string(), &seconds.to_string()];
        let limit = Duration::from_secs_f64(seconds) + Duration::from_secs(20);
        let out = client::output(ns, Some(cgroup), &args, limit)?;
        out.trim().parse()
    }
}

/// The Service: TCP and UDP on SERVICE's port, BACKEND its endpoint.
fn manifest() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: bench}}\nspec: {{clusterIP: {ip}, ports: [{{name: tcp, port: {port}, targetPort: {BACKEND_PORT}}}, {{name: udp, protocol: UDP, port: {port}, targetPort: {BACKEND_PORT}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: bench-1, labels: {{kubernetes.io/service-name: bench}}}}\naddressType: IPv4\nports: [{{name: tcp, port: {BACKEND_PORT}}}, {{name: udp, protocol: UDP, port: {BACKEND_PORT}}}]\nendpoints: [{{addresses: [\"{pod}\"], nodeName: node2}}]\n",
        ip = SERVICE.ip(),
        port = SERVICE.port(),
        pod = BACKEND.ip(),
    )
}

fn requests(cases: &[Case], options: &Options) -> Result<bool> {
    let lab = RequestLab::start()?;
    let mut rows: Vec<Row> = cases.iter().map(|_| Row::default()).collect();
    let started = Instant::now();
    for round in 0..options.rounds {
        for i in (0..cases.len()).map(|i| (i + round) % cases.len()) {
            let (case, row) = (&cases[i], &mut rows[i]);
            let before = Snapshot::settled(&lab.cluster)?;
            let called = lab.call(case, options.seconds);
            let after = Snapshot::settled(&lab.cluster)?;
            let checked = match (called, before, after) {
                (Err(e), _, _) => Err(Refusal::Disagrees(format!("the client failed: {e:#}"))),
                (Ok(stats), Some(before), Some(after)) => {
                    verify(case, &stats, &after.since(&before)).map(|proof| (stats, proof))
                }
                (Ok(_), _, _) => Err(Refusal::Unmeasured("the counters did not stop moving within 1.2 s".into())),
            };
            if let Some(sample) = row.standing.record(round, checked) {
                row.samples.push(sample);
            }
        }
    }
    println!("timed {} rounds in {:.1} s\n", options.rounds, started.elapsed().as_secs_f64());
    print_requests(cases, &rows, options);
    Ok(rows.iter().all(|r| r.standing.passes()))
}

fn print_requests(cases: &[Case], rows: &[Row], options: &Options) {
    println!(
        "End to end, a pod on node1 or node1 itself -> a pod on node2: {} interleaved rounds of {} s per case; rate best and \
         median round; latencies: the median round's p50 and p99",
        options.rounds, options.seconds
    );
    println!(
        "x direct: the rate as a share of the direct path's (best/best, median/median), the p50 as a multiple of its"
    );
    println!(
        "{:<48} {:>6} {:>9} {:>9} {:>8} {:>8}  {:>11} {:>11} {:>10}",
        "case", "unit", "best", "median", "p50 us", "p99 us", "x dir best", "x dir med", "x dir p50"
    );
    for (case, row) in cases.iter().zip(rows) {
        if let Some(why) = &row.standing.refused {
            println!("{:<48} {}, {why}", case.name(), if row.standing.unmeasured { "NOT MEASURED" } else { "REFUSED" });
            continue;
        }
        let direct = cases
            .iter()
            .position(|c| (c.from, c.exchange, c.route) == (case.from, case.exchange, case.direct().route))
            .map(|d| &rows[d])
            .filter(|d| d.standing.refused.is_none());
        let p50 = row.median_of(|s| s.p50_us);
        let (best, median, latency) = match direct {
            Some(d) if case.route != Route::Direct => (
                format!("{:.2}", row.best_rate() / d.best_rate()),
                format!("{:.2}", row.median_rate() / d.median_rate()),
                format!("{:.2}", p50 as f64 / d.median_of(|s| s.p50_us).max(1) as f64),
            ),
            _ => (String::new(), String::new(), String::new()),
        };
        println!(
            "{:<48} {:>6} {:>9.0} {:>9.0} {:>8} {:>8}  {:>11} {:>11} {:>10}",
            case.name(),
            case.unit(),
            row.best_rate(),
            row.median_rate(),
            p50,
            row.median_of(|s| s.p99_us),
            best,
            median,
            latency
        );
    }
    println!("node, ClusterIP without socket-LB: not served (no packet hook sees the node's own sockets)");
    println!("\nwhat each row's first call showed (every call checked):");
    for (case, row) in cases.iter().zip(rows).filter(|(_, r)| r.standing.refused.is_none()) {
        println!("  {}: {}", case.name(), row.standing.proof);
    }
    println!();
}

fn conntrack_sweep(options: &Options) -> Result<bool> {
    let (flows, rounds) = (options.sweep_flows, options.rounds);
    let room = 2 * flows + 65_536;
    let setup = Setup { conntrack_entries: room, admit_limit: room, ..Setup::fast((1024, 65535)) };
    with_fixture(setup, move |fx| sweep_rounds(fx, flows, rounds))
}

/// A planted flow's kind: its phase, and how long ago it was last seen.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Planted {
    /// Established, seen within the last minute: alive (24 h timeout).
    Established,
    /// Both FINs seen 11-60 s ago: expired (10 s after close).
    Closed,
    /// A SYN that got no answer 11-60 s ago: expired (10 s).
    Unanswered,
}

impl Planted {
    fn of(n: u32) -> Planted {
        match n % (2 * EXPIRED_EVERY) {
            0 => Planted::Closed,
            EXPIRED_EVERY => Planted::Unanswered,
            _ => Planted::Established,
        }
    }
}

/// Sweep `rounds` times over `flows` flows, the expired ones planted again before each.
fn sweep_rounds(fx: &mut Fixture, flows: u32, rounds: usize) -> Result<bool> {
    let mut bench = Bench::new(fx)?;
    let started = Instant::now();
    let (template, backends) = sweep_template(fx)?;
    let now = ct_now();
    ensure!(now > secs(120), "the machine booted under 2 minutes ago: the planted stamps would be before boot");
    let (lo, _) = fx.setup.snat_ports;
    let mut rng = SplitMix64(SEED);
    let flow = |n: u32, rng: &mut SplitMix64| {
        let planted = Planted::of(n);
        let (id, backend) = backends[(n % SWEEP_BACKENDS) as usize];
        // Each backend's flows take its NAT ports in turn; 50 000 client ports per address.
        let nat_port = lo + (n / SWEEP_BACKENDS) as u16;
        let client = SocketAddrV4::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + n / 50_000),
            10_000 + (n % 50_000) as u16,
        );
        let age = match planted {
            Planted::Established => rng.next_u64() % 60,
            _ => 11 + rng.next_u64() % 50,
        };
        let mut f = template.to_backend(id, backend).like(client, nat_port, rng.nonce(), now - secs(age));
        for v in [&mut f.forward.1, &mut f.reply.1] {
            match planted {
                Planted::Established => {}
                Planted::Closed => v.state |= bits::FIN_ORIG | bits::FIN_REPLY,
                Planted::Unanswered => v.state &= !bits::ESTABLISHED,
            }
        }
        // A closed flow has left its backend's open flows; an unanswered one still counts.
        if planted == Planted::Closed {
            f.forward.1.state &= !bits::LIVE;
        }
        f
    };
    let live: Vec<u32> = (0..flows).filter(|n| Planted::of(*n) == Planted::Established).collect();
    let expired: Vec<u32> = (0..flows).filter(|n| Planted::of(*n) != Planted::Established).collect();
    let added = insert_flows(fx, &mut bench, live.iter().map(|n| flow(*n, &mut rng)))?;
    ensure!(added == 2 * live.len() as u64, "inserted {added} entries for {} flows", live.len());
    println!("conntrack sweep: {} live flows planted in {:.1} s", live.len(), started.elapsed().as_secs_f64());
    let mut conntrack = Conntrack::open(&fx.pin_dir)?;
    let open_flows = |fx: &Fixture| backends.iter().map(|(id, _)| fx.backend_live(*id)).sum::<u64>();
    let (mut full, mut idle) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let planted: Vec<Flow> = expired.iter().map(|n| flow(*n, &mut rng)).collect();
        insert_flows(fx, &mut bench, planted)?;
        let entries = bench.ct_entries()?;
        let total = 2 * flows as u64;
        let refuse = |why: String| {
            println!("conntrack sweep REFUSED, round {}: {why}", round + 1);
            Ok(false)
        };
        if entries != total {
            return refuse(format!("LB_CT_STATE counts {entries} entries, {total} planted"));
        }
        let swept = Instant::now();
        let sweep = conntrack.sweep()?;
        let took = swept.elapsed();
        let (entries_after, open_after) = (bench.ct_entries()?, open_flows(fx));
        let want = (total as usize, 2 * expired.len(), expired.len(), 2 * live.len() as u64, live.len() as u64);
        let got = (sweep.entries, sweep.candidates, sweep.removed, entries_after, open_after);
        if got != want {
            return refuse(format!(
                "(entries read, dead found, flows removed, LB_CT_STATE after, LB_BE_LIVE after) = {got:?}, expected {want:?}"
            ));
        }
        full.push((sweep.read_ms, sweep.reap_ms, took, sweep.held_bytes));
        // The steady state: the same table with nothing to remove.
        let swept = Instant::now();
        let again = conntrack.sweep()?;
        let took = swept.elapsed();
        if (again.entries, again.candidates, again.removed) != (2 * live.len(), 0, 0) {
            return refuse(format!("a second sweep found {again:?}, expected nothing to remove"));
        }
        idle.push((again.read_ms, again.reap_ms, took, again.held_bytes));
    }
    let show = |label: &str, entries: usize, samples: &mut Vec<(u128, u128, Duration, usize)>| {
        samples.sort_by_key(|s| s.2);
        let (best, median) = (samples[0], samples[samples.len() / 2]);
        let most_held = samples.iter().map(|s| s.3).max().unwrap_or(0);
        println!(
            "{label:<48} {entries:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.1}",
            best.0,
            best.1,
            best.2.as_millis(),
            median.0,
            median.1,
            median.2.as_millis(),
            most_held as f64 / 1e6
        );
    };
    println!(
        "\nConntrack sweep (lb_user Conntrack::sweep): {rounds} rounds, ms; read: BPF_MAP_LOOKUP_BATCH and copying \
         out, reap: the reaper's runs, total: both and finding the dead; best and median round by total; held: the \
         most memory a sweep held to find the dead (MB, its own count)"
    );
    println!(
        "{:<48} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "sweep", "entries", "read", "reap", "total", "med read", "med reap", "med total", "held MB"
    );
    show(
        &format!("{} flows, {} expired (removed: all, each round)", flows, expired.len()),
        2 * flows as usize,
        &mut full,
    );
    show("the same table swept again, nothing expired", 2 * live.len(), &mut idle);
    println!(
        "every round: removed {} flows = the {} planted expired ({} closed, {} unanswered SYNs); LB_CT_STATE {} and \
         LB_BE_LIVE {} after, as the live flows need",
        expired.len(),
        expired.len(),
        expired.iter().filter(|n| Planted::of(**n) == Planted::Closed).count(),
        expired.iter().filter(|n| Planted::of(**n) == Planted::Unanswered).count(),
        2 * live.len(),
        live.len()
    );
    // What a /metrics scrape reads of the same table (streamed: the NAT ports in use), proved
    // by the SNAT flows it counts.
    let mut scrapes = Vec::new();
    for _ in 0..3 {
        let began = Instant::now();
        let usage = lb_user::telemetry::status::Usage::read(&fx.pin_dir)?;
        scrapes.push(began.elapsed());
        if usage.nat.snat_flows != live.len() as u64 {
            println!("scrape REFUSED: it counted {} SNAT flows, {} are live", usage.nat.snat_flows, live.len());
            return Ok(false);
        }
    }
    scrapes.sort();
    println!(
        "a /metrics scrape's read of the maps (Usage::read) over these {} entries: median {} ms of 3; each counted the {} \
         SNAT flows",
        2 * live.len(),
        scrapes[1].as_millis(),
        live.len()
    );
    Ok(true)
}

/// A NodePort flow the datapath opened and established (then removed, so its NAT port is
/// free), and the backends of the sweep's frontend, written as the reconciler would.
fn sweep_template(fx: &mut Fixture) -> Result<(Flow, Vec<(u32, lb_common::Backend)>)> {
    let frontend = SocketAddrV4::new(NODE, SWEEP_FRONTEND_PORT);
    let addrs: Vec<SocketAddrV4> = (0..SWEEP_BACKENDS)
        .map(|i| SocketAddrV4::new(Ipv4Addr::from(u32::from(REMOTE_POD) + 1 + i), BACKEND_PORT))
        .collect();
    let mut writer = ServiceWriter::open(fx)?;
    let like = ServiceKey::new(NODE, 30080, IPPROTO_TCP);
    let backends = writer.add(ServiceKey::new(NODE, SWEEP_FRONTEND_PORT, IPPROTO_TCP), like, &addrs)?;
    writer.finish()?;
    let template = handshake(fx, SocketAddrV4::new(CLIENT, 40001), frontend)?;
    ensure!(template.snat(), "NodePort flows to a remote backend take a NAT port");
    ensure!(Conntrack::open(&fx.pin_dir)?.remove(&[template.forward.0])? == 1, "removing the template flow");
    ensure!(
        backends.iter().map(|(id, _)| fx.backend_live(*id)).sum::<u64>() == 0,
        "the template flow left no open flow behind"
    );
    Ok((template, backends))
}
