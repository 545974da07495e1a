//! Control-plane benchmark (issue 9): the agent in cluster mode in a lab node, against the
//! in-memory API server (lb_tests::fake_api) holding N Services of one TCP port, each with
//! an EndpointSlice of 10 endpoints.
//!
//! - Network programming latency: one endpoint change at a time (an 11th endpoint added to
//!   a Service's slice, or removed again), timed from the API write (the store's commit,
//!   just before the watch event leaves) until LB_SERVICES holds the frontend's new backend
//!   count, read by a tight loop of map lookups.
//! - First full sync: the agent starts with every object already in the API server; timed
//!   from its first Service list request until every frontend is in LB_SERVICES with all
//!   of its backends; the agent's peak RSS (VmHWM) after it.
//!
//! Every row proves what it measured: after each change the frontend's live slots are read
//! back and must name the added endpoint (or no longer name the removed one); after the
//! sync every frontend's slots must hold exactly its 10 endpoints; and the API server's
//! request log must show one list per resource (every change came through a watch, none
//! through a relist). A row that disagrees is REFUSED with why, and the exit status is
//! non-zero. Targets are printed beside the results, not enforced: this is a measurement.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use aya::maps::{Array, HashMap, MapData};
use lb_common::{map_names, user::ip_from_be, Backend, ServiceKey, ServiceValue, SlotKey, IPPROTO_TCP};
use lb_tests::{
    agent::Agent,
    api_cluster::ApiCluster,
    bench::SplitMix64,
    fake_api::{
        store::{resource_id, Part},
        Faults,
    },
    lab::Spec,
};
use serde_json::json;

const ENDPOINTS: u32 = 10;
const SAMPLES: usize = 200;
const PORT: u16 = 80;
/// How long one change may take before the row is refused.
const CHANGE_LIMIT: Duration = Duration::from_secs(10);
const SYNC_LIMIT: Duration = Duration::from_secs(120);
/// Pauses between map reads while waiting: the agent shares the CPUs with this loop, so a
/// loop that never sleeps would slow what it times. They bound the figures' resolution.
const CHANGE_POLL: Duration = Duration::from_micros(50);
const SYNC_POLL: Duration = Duration::from_millis(1);

fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i)
}

/// Endpoint `j` of Service `i` (j = ENDPOINTS is the one the latency changes add).
fn endpoint(i: u32, j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 16 + j)
}

fn slice(i: u32, endpoints: u32) -> serde_json::Value {
    let endpoints: Vec<_> = (0..endpoints)
        .map(|j| json!({"addresses": [endpoint(i, j).to_string()], "nodeName": "elsewhere", "conditions": {"ready": true}}))
        .collect();
    json!({
        "metadata": {"name": format!("svc-{i}-1"), "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints,
    })
}

/// Puts N Services and their slices straight into the API server's store.
fn populate(faults: &Faults, services: u32) -> Result<()> {
    let service_id = resource_id("", "v1", "services").context("services")?;
    let slice_id = resource_id("discovery.k8s.io", "v1", "endpointslices").context("endpointslices")?;
    faults.with_store(|store| {
        for i in 0..services {
            let service = json!({
                "metadata": {"name": format!("svc-{i}")},
                "spec": {"clusterIP": cluster_ip(i).to_string(), "ports": [{"name": "http", "protocol": "TCP", "port": PORT, "targetPort": 8080}]},
            });
            store.create(service_id, "default", service).map_err(|e| anyhow::anyhow!("{}", e.message))?;
            store.create(slice_id, "default", slice(i, ENDPOINTS)).map_err(|e| anyhow::anyhow!("{}", e.message))?;
        }
        Ok(())
    })
}

struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: Array<MapData, Backend>,
}

impl Maps {
    fn open(agent: &Agent) -> Result<Maps> {
        let open = |name| lb_user::datapath::open_map(&agent.pin_dir, name).with_context(|| format!("opening {name}"));
        Ok(Maps {
            services: open(map_names::SERVICES)?.try_into()?,
            slots: open(map_names::SLOTS)?.try_into()?,
            backends: open(map_names::BACKENDS)?.try_into()?,
        })
    }

    fn frontend(&self, i: u32) -> Option<ServiceValue> {
        self.services.get(&ServiceKey::new(cluster_ip(i), PORT, IPPROTO_TCP), 0).ok()
    }

    /// The endpoint addresses of frontend `i`'s live slots.
    fn backends_of(&self, i: u32) -> Result<BTreeSet<Ipv4Addr>> {
        let value = self.frontend(i).with_context(|| format!("svc-{i} is not in LB_SERVICES"))?;
        let mut addresses = BTreeSet::new();
        for position in 0..u32::from(value.count[0]) {
            let id = self.slots.get(&SlotKey::new(value.svc_id, value.gen, 0, position), 0)?;
            let backend = self.backends.get(&id, 0)?;
            addresses.insert(ip_from_be(backend.addr_be));
        }
        Ok(addresses)
    }
}

fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM")?;
    Ok(line.split_whitespace().nth(1).context("VmHWM value")?.parse()?)
}

/// Lists of one resource the agent started (not watches, nor the next pages of a list).
fn lists_of(faults: &Faults, plural: &str) -> usize {
    faults
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with(&format!("/{plural}")))
        .filter(|r| !r.query.contains("watch=") && !r.query.contains("continue="))
        .count()
}

struct Sync {
    from_list: Duration,
    from_start: Duration,
    hwm_kib: u64,
}

/// Starts the agent on a cluster holding `services` Services and times its first sync.
fn first_sync(cluster: &mut ApiCluster, services: u32) -> Result<Sync> {
    let node = &cluster.lab.nodes[0];
    let started = Instant::now();
    let agent = Agent::spawn_cluster(node, &cluster.api_url, &["--max-backends", "131072"])?;
    let deadline = started + SYNC_LIMIT;
    let maps = loop {
        if let Ok(maps) = Maps::open(&agent) {
            break maps;
        }
        ensure!(Instant::now() < deadline, "the agent pinned no maps within {SYNC_LIMIT:?}:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(1));
    };
    // The last Service the agent is still missing, checked again until every one is there.
    let mut next = 0;
    while next < services {
        if maps.frontend(next).is_some_and(|v| u32::from(v.count[0]) == ENDPOINTS) {
            next += 1;
            continue;
        }
        ensure!(Instant::now() < deadline, "svc-{next} not programmed within {SYNC_LIMIT:?}:\n{}", agent.log_text());
        std::thread::sleep(SYNC_POLL);
    }
    let done = Instant::now();
    let faults = cluster.faults();
    let first_list = faults
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/services") && !r.query.contains("watch="))
        .context("the agent never listed Services")?;
    for i in 0..services {
        let want: BTreeSet<Ipv4Addr> = (0..ENDPOINTS).map(|j| endpoint(i, j)).collect();
        let got = maps.backends_of(i)?;
        ensure!(got == want, "svc-{i}'s slots hold {got:?}, not its {ENDPOINTS} endpoints");
    }
    agent.wait_until_ready(Duration::from_secs(30))?;
    let hwm_kib = vm_hwm_kib(agent.pid())?;
    cluster.agents.push(agent);
    Ok(Sync { from_list: done - first_list.at, from_start: done - started, hwm_kib })
}

/// One endpoint change at a time on random Services; the latencies, sorted.
fn latencies(cluster: &ApiCluster, services: u32) -> Result<Vec<Duration>> {
    let slice_id = resource_id("discovery.k8s.io", "v1", "endpointslices").context("endpointslices")?;
    let faults = cluster.faults();
    let maps = Maps::open(&cluster.agents[0])?;
    let mut rng = SplitMix64(services as u64);
    let mut grown = BTreeSet::new();
    let mut samples = Vec::new();
    for _ in 0..SAMPLES {
        let i = (rng.next_u64() % services as u64) as u32;
        let adding = grown.insert(i);
        if !adding {
            grown.remove(&i);
        }
        let endpoints = if adding { ENDPOINTS + 1 } else { ENDPOINTS };
        let patch = json!({"endpoints": slice(i, endpoints)["endpoints"]});
        let written = Instant::now();
        faults
            .with_store(|store| store.patch(slice_id, "default", &format!("svc-{i}-1"), &patch, Part::Object))
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        loop {
            if maps.frontend(i).is_some_and(|v| u32::from(v.count[0]) == endpoints) {
                break;
            }
            std::thread::sleep(CHANGE_POLL);
            ensure!(
                written.elapsed() < CHANGE_LIMIT,
                "svc-{i}: the change to {endpoints} endpoints did not arrive within {CHANGE_LIMIT:?}"
            );
        }
        samples.push(written.elapsed());
        let holds = maps.backends_of(i)?.contains(&endpoint(i, ENDPOINTS));
        ensure!(holds == adding, "svc-{i}'s slots {} the changed endpoint", if holds { "still hold" } else { "lack" });
    }
    for plural in ["services", "endpointslices"] {
        let lists = lists_of(&faults, plural);
        ensure!(lists == 1, "the agent listed {plural} {lists} times: changes did not all come through its watch");
    }
    samples.sort();
    Ok(samples)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// What one /metrics scrape costs the agent: its time, and the agent's peak RSS after it.
struct ScrapeCost {
    took: Duration,
    hwm_kib: u64,
}

/// One /metrics scrape (Prometheus's, every 15-30 s in a cluster), proved by its series: one
/// per Service (its ClusterIP) and one per endpoint.
fn scrape_cost(cluster: &ApiCluster, services: u32) -> Result<ScrapeCost> {
    let agent = &cluster.agents[0];
    let started = Instant::now();
    let scrape = lb_tests::metrics::scrape(&cluster.lab.nodes[0].ns.name);
    let took = started.elapsed();
    let series = |name: &str| scrape.samples.iter().filter(|(n, _, _)| n == name).count();
    let (frontends, endpoints) =
        (series("kube_xdp_lb_service_packets_total"), series("kube_xdp_lb_backend_packets_total"));
    // The latency samples leave some Services with an 11th endpoint.
    ensure!(
        frontends == services as usize && endpoints >= (services * ENDPOINTS) as usize,
        "the scrape served {frontends} Service series and {endpoints} endpoint series for {services} Services"
    );
    Ok(ScrapeCost { took, hwm_kib: vm_hwm_kib(agent.pid())? })
}

fn scale(services: u32) -> Result<(Sync, Vec<Duration>, ScrapeCost)> {
    let spec = Spec { pods_per_node: vec![0], clients: 0, ..Spec::default() };
    let mut cluster = ApiCluster::without_agents("lbc", &spec)?;
    populate(&cluster.faults(), services)?;
    let sync = first_sync(&mut cluster, services)?;
    let latencies = latencies(&cluster, services)?;
    let scrape = scrape_cost(&cluster, services)?;
    Ok((sync, latencies, scrape))
}

fn main() -> ExitCode {
    lb_tests::require_root();
    match lb_tests::agent::lb_user_bin() {
        Ok(bin) => {
            // The targets are for an optimized agent; a debug build is several times slower.
            let profile = if bin.components().any(|c| c.as_os_str() == "debug") { " (a DEBUG build)" } else { "" };
            println!("agent: {}{profile}", bin.display());
        }
        Err(e) => {
            println!("bench_control: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    println!("control plane: the agent in cluster mode against the in-memory API server; Services of one TCP port, {ENDPOINTS} endpoints each");
    println!(
        "latency: API write -> LB_SERVICES holding the change (maps read every {CHANGE_POLL:?}); sync: the agent's first Service list -> every frontend programmed (read every {SYNC_POLL:?})"
    );
    println!("{:<9} {:<38} {:>10} {:>10} {:>10}  {:<16} proof", "services", "row", "p50", "p99", "max", "target");
    let mut all_good = true;
    for services in [1_000, 10_000] {
        match scale(services) {
            Ok((sync, samples, scrape)) => {
                println!(
                    "{services:<9} {:<38} {:>10} {:>10} {:>10}  {:<16} {} samples, each read back from the slots; 1 list per resource",
                    "endpoint change -> LB_SERVICES",
                    ms(percentile(&samples, 0.5)),
                    ms(percentile(&samples, 0.99)),
                    ms(*samples.last().unwrap()),
                    if services == 10_000 { "p99 < 5 ms" } else { "" },
                    samples.len(),
                );
                println!(
                    "{services:<9} {:<38} {:>10} {:>10} {:>10}  {:<16} every frontend's slots hold its {ENDPOINTS} endpoints; agent VmHWM {} MiB ({:.1} MB){}",
                    "first full sync (from the first list)",
                    ms(sync.from_list),
                    "",
                    "",
                    if services == 10_000 { "< 1 s, < 64 MB" } else { "" },
                    sync.hwm_kib / 1024,
                    sync.hwm_kib as f64 * 1024.0 / 1e6,
                    format_args!(" ({} from the agent's start)", ms(sync.from_start)),
                );
                println!(
                    "{services:<9} {:<38} {:>10} {:>10} {:>10}  {:<16} a series per Service and per endpoint; agent VmHWM after it {} MiB ({:.1} MB)",
                    "a /metrics scrape",
                    ms(scrape.took),
                    "",
                    "",
                    "",
                    scrape.hwm_kib / 1024,
                    scrape.hwm_kib as f64 * 1024.0 / 1e6,
                );
            }
            Err(e) => {
                all_good = false;
                println!("{services:<9} REFUSED: {e:#}");
            }
        }
    }
    if all_good {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
