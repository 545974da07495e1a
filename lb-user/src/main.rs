use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use globset::{Glob, GlobSetBuilder};
use ipnet::Ipv4Net;
use lb_user::{agent, cli::render, datapath, model, netns, source::manifests as source, telemetry};

#[derive(Parser)]
#[command(name = "lb-user", about = "eBPF/XDP Kubernetes Service load balancer: agent and CLI")]
struct Cli {
    /// Run in this network namespace (a name under /run/netns, as `ip netns add` makes).
    #[arg(long, global = true)]
    netns: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct PinDir {
    /// Where programs, links and maps are pinned.
    #[arg(long, default_value = lb_common::PIN_DIR)]
    pin_dir: PathBuf,
}

// Parsed once: the agent's many options need no box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Load the programs, pin them and their maps, attach them, and exit (they keep running).
    Load {
        #[command(flatten)]
        pin: PinDir,
        #[command(flatten)]
        capacity: CapacityArgs,
        /// Uplink interface(s) for the XDP program.
        #[arg(long, required = true)]
        iface: Vec<String>,
        /// Pod-facing interface(s) for the tc program.
        #[arg(long)]
        pod_iface: Vec<String>,
    },
    /// Detach and unpin everything under the pin directory (only this product's own pins;
    /// anything else there is refused, and then nothing is removed). The agent leaves the
    /// datapath running when it stops; this is how a node is cleared of it.
    #[command(visible_alias = "uninstall")]
    Unload {
        #[command(flatten)]
        pin: PinDir,
    },
    /// Print what the datapath counted, by reason (`status` groups them; `stats` has the
    /// traffic per frontend and backend).
    Counters {
        #[command(flatten)]
        pin: PinDir,
        #[command(flatten)]
        output: Output,
    },
    /// Every frontend with its backends and their state (active, short-circuit, retained,
    /// local), live flows and traffic, read from the pinned maps (works while the agent is
    /// down). With the agent's --manifests and --node-name (and node options), also what
    /// differs from the model.
    Services {
        #[command(flatten)]
        pin: PinDir,
        #[command(flatten)]
        output: Output,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Packets, bytes and new flows per frontend (Service port) and per backend, with rates
    /// when sampled over an interval.
    Stats {
        #[command(flatten)]
        pin: PinDir,
        #[command(flatten)]
        output: Output,
        /// Refresh in place every --interval until Ctrl-C (or --count readings); with
        /// --json, one JSON object per line.
        #[arg(long)]
        watch: bool,
        /// Seconds between readings; without --watch, read twice this far apart to show rates.
        #[arg(long, value_parser = parse_interval)]
        interval: Option<f64>,
        /// With --watch, stop after this many readings.
        #[arg(long, requires = "watch", value_parser = clap::value_parser!(u32).range(1..))]
        count: Option<u32>,
    },
    /// Tracked flows (conntrack): both tuples, state, age, NAT mapping and backend.
    Ct {
        #[command(flatten)]
        pin: PinDir,
        #[command(flatten)]
        output: Output,
        /// Only flows of this Service, NAMESPACE/NAME.
        #[arg(long, value_parser = parse_service_name)]
        service: Option<(String, String)>,
        /// Only flows to this backend address.
        #[arg(long)]
        backend: Option<Ipv4Addr>,
    },
    /// One screen of health: the agent's last sync, programs and where they are attached,
    /// map occupancy against capacity, NAT port use, counters by reason.
    Status {
        #[command(flatten)]
        pin: PinDir,
        #[command(flatten)]
        output: Output,
    },
    /// Connected sockets the socket hooks translated and still track: the Service address
    /// the application connected to, and the backend it is connected to.
    Sockets {
        #[command(flatten)]
        pin: PinDir,
    },
    /// Run the agent: serve the Services of manifest files (standalone mode) or of the API
    /// server (cluster mode).
    Agent {
        #[command(flatten)]
        pin: PinDir,
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        node: NodeArgs,
        /// Where /healthz, /livez and /readyz are served (kube-proxy's port).
        #[arg(long, default_value = "0.0.0.0:10256")]
        healthz_bind_address: std::net::SocketAddr,
        #[command(flatten)]
        local: LocalArgs,
        /// Uplink interface(s) for the XDP program (repeat the option, or separate with commas).
        #[arg(long, required = true, value_delimiter = ',')]
        iface: Vec<String>,
        /// Pod-facing devices get the tc program: names matching these glob patterns (repeat
        /// the option, or separate with commas). Overlay tunnels belong here too (flannel's
        /// `flannel.1`, Calico's `vxlan.calico`): replies from backends on other nodes arrive
        /// on them and must be translated back.
        #[arg(long = "pod-devices", default_values = ["veth*", "lxc*", "cali*", "flannel*", "vxlan*"], value_delimiter = ',', value_parser = parse_glob)]
        pod_devices: Vec<Glob>,
        /// SNAT source port range, MIN-MAX.
        #[arg(long, default_value = "32768-65535", value_parser = parse_port_range)]
        snat_ports: (u16, u16),
        #[command(flatten)]
        datapath: DatapathArgs,
        #[command(flatten)]
        sockets: SocketArgs,
        /// Serve Prometheus metrics on /metrics at IP:PORT (an IP alone: port 10249; "" turns
        /// it off), as kube-proxy's flag of this name.
        #[arg(long, default_value = telemetry::metrics::DEFAULT_BIND_ADDRESS, value_parser = parse_bind_address)]
        metrics_bind_address: BindAddress,
        /// Serve the per-endpoint series (kube_xdp_lb_backend_*: four per endpoint of each
        /// Service port). A large cluster may turn them off to spare its Prometheus and the
        /// scrapes (kube-proxy serves none); the per-Service series stay.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        metrics_endpoint_series: bool,
        /// Seconds between comparisons of the service maps with what the agent last applied;
        /// what differs (changed behind its back) is written again, logged and counted.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
        drift_check_interval: u64,
    },
    /// Which backend the datapath gives a flow (from the pinned maps: works while the agent
    /// is down): a tracked flow's, or a new flow's by affinity and the frontend's algorithm.
    Which {
        #[command(flatten)]
        pin: PinDir,
        /// tcp or udp.
        #[arg(value_parser = datapath::predict::parse_proto)]
        proto: u8,
        /// The client, ADDRESS:PORT.
        src: std::net::SocketAddrV4,
        /// The frontend, ADDRESS:PORT.
        dst: std::net::SocketAddrV4,
    },
    /// Print this node's desired state for manifests (Service, EndpointSlice, Endpoints, Node).
    Model {
        /// Manifest file or directory.
        #[arg(long)]
        manifests: PathBuf,
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(Args, Clone, Copy)]
struct Output {
    /// Print JSON (field names are stable: docs/CLI.md) instead of tables.
    #[arg(long)]
    json: bool,
}

/// The model to compare the maps with: the agent's node options (NodeArgs's, optional here:
/// clap cannot leave out a flattened group whose arguments have defaults).
#[derive(Args, Clone)]
struct ModelArgs {
    /// Compare the maps with the model of these manifests (file or directory), as the agent
    /// reads them.
    #[arg(long, requires = "node_name")]
    manifests: Option<PathBuf>,
    /// This node's name, as the agent has it.
    #[arg(long, requires = "manifests")]
    node_name: Option<String>,
    /// This node's addresses, as the agent has them.
    #[arg(long = "node-address")]
    node_addresses: Vec<Ipv4Addr>,
    /// This node's zone, as the agent has it.
    #[arg(long)]
    zone: Option<String>,
    /// As the agent has them.
    #[arg(long)]
    nodeport_addresses: Vec<Ipv4Net>,
    /// The node's default algorithm, as the agent has it.
    #[arg(long, default_value = "random", value_parser = model::Algorithm::parse)]
    algorithm: model::Algorithm,
    #[command(flatten)]
    maglev: MaglevArgs,
}

impl ModelArgs {
    /// The manifests and the node options, when the manifests are given.
    fn node(&self) -> Option<(PathBuf, NodeArgs)> {
        Some((
            self.manifests.clone()?,
            NodeArgs {
                node_name: self.node_name.clone()?,
                node_addresses: self.node_addresses.clone(),
                zone: self.zone.clone(),
                nodeport_addresses: self.nodeport_addresses.clone(),
                algorithm: self.algorithm,
            },
        ))
    }
}

#[derive(Args, Clone, Copy)]
struct MaglevArgs {
    /// Maglev tables (maglev and source-hash Services) have at least this many positions per
    /// backend; their size is the first of 7, 13, 31, ..., 509, 1021, ... (the largest prime
    /// below each power of two) that fits, so one backend more or less keeps it (and the
    /// other flows where they are). Every node must use the same figure.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    maglev_positions_per_backend: u32,
    /// Maglev tables have at most this many positions.
    #[arg(long, default_value_t = 65_521, value_parser = clap::value_parser!(u32).range(7..=1_000_003))]
    maglev_max_positions: u32,
}

impl MaglevArgs {
    fn size(self) -> lb_user::reconcile::MaglevSize {
        lb_user::reconcile::MaglevSize {
            per_backend: self.maglev_positions_per_backend,
            max: self.maglev_max_positions,
        }
    }
}

#[derive(Args, Clone, Copy)]
struct CapacityArgs {
    /// Connections (flows) conntrack can hold: two entries each (memory: see
    /// --conntrack-memory). A pinned table keeps the size it was created with.
    #[arg(long, default_value_t = lb_common::DEFAULT_CONNTRACK_ENTRIES / 2, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    conntrack_flows: u32,
    /// How conntrack holds its kernel memory. on-demand: 16 bytes per entry of capacity at
    /// start (the hash buckets: 16 MiB at the default 1 048 576 entries), then 192 bytes per
    /// entry in use, allocated as flows start and given back as they end (two entries per
    /// flow; about 218 MB with the default capacity full). preallocated: 160 bytes per entry
    /// of capacity, all at start (168 MB at the default), whether flows use it or not; a new
    /// flow's two inserts take ready elements and cost less (BENCHMARKS.md, new-flow rows
    /// of both kinds). The default is on-demand: memory follows the flows, and most nodes
    /// hold far fewer than the capacity. A pinned table keeps the kind it was created with:
    /// starting with the other kind is refused.
    #[arg(long, value_enum, default_value_t = ConntrackMemory::OnDemand)]
    conntrack_memory: ConntrackMemory,
    /// Frontends (address:port:protocol) the datapath can serve; each has per-CPU counters
    /// (16 bytes per CPU).
    #[arg(long, default_value_t = lb_common::DEFAULT_FRONTENDS, value_parser = clap::value_parser!(u32).range(16..=lb_common::MAX_SERVICES as i64))]
    max_frontends: u32,
    /// Backends (endpoint address:port of a Service port) the datapath can hold; each has
    /// per-CPU counters (24 bytes per CPU) and an open-flow count.
    #[arg(long, default_value_t = lb_common::DEFAULT_BACKENDS, value_parser = clap::value_parser!(u32).range(16..=4_194_304))]
    max_backends: u32,
}

impl CapacityArgs {
    fn capacity(self) -> datapath::Capacity {
        datapath::Capacity {
            conntrack_entries: self.conntrack_flows * 2,
            conntrack_memory: match self.conntrack_memory {
                ConntrackMemory::OnDemand => datapath::ConntrackMemory::OnDemand,
                ConntrackMemory::Preallocated => datapath::ConntrackMemory::Preallocated,
            },
            frontends: self.max_frontends,
            backends: self.max_backends,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ConntrackMemory {
    /// Allocated per flow as flows start, given back as they end.
    OnDemand,
    /// All of it at start, for the whole capacity.
    Preallocated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Forwarding {
    /// Translated packets go through the node's stack, so netfilter's forward hook (where
    /// netfilter-based CNIs enforce NetworkPolicy) sees them: the destination side is
    /// rewritten on the way in, the source side (SNAT) on the way out, as kube-proxy does.
    Netfilter,
    /// Translated packets leave straight from XDP (XDP_TX) or tc (bpf_redirect_neigh):
    /// faster, but they BYPASS the node's netfilter forward hook and so any NetworkPolicy or
    /// firewall rule enforced there.
    Fast,
}

#[derive(Args, Clone, Copy)]
struct DatapathArgs {
    #[command(flatten)]
    capacity: CapacityArgs,
    /// New connections are refused (and counted) once conntrack is this full (percent), so
    /// a flood of new flows never pushes out established ones.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(10..=100))]
    conntrack_admit_percent: u32,
    #[arg(long, value_enum, default_value_t = Forwarding::Netfilter)]
    forwarding: Forwarding,
    /// skb->mark bits [SHIFT, SHIFT+16) carry the netfilter mode's hand-over from ingress to
    /// egress; pick bits no other component of the node uses.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=16))]
    mark_shift: u32,
    #[command(flatten)]
    maglev: MaglevArgs,
}

impl DatapathArgs {
    fn options(self) -> agent::DatapathOptions {
        agent::DatapathOptions {
            capacity: self.capacity.capacity(),
            admit_percent: self.conntrack_admit_percent,
            mode: match self.forwarding {
                Forwarding::Netfilter => lb_common::mode::NETFILTER,
                Forwarding::Fast => lb_common::mode::FAST,
            },
            mark_shift: self.mark_shift,
            maglev: self.maglev.size(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SocketLb {
    /// Sockets of every process under the cgroup: the node's own and its pods'.
    All,
    /// Only sockets in the node's own network namespace (host-network processes); pods'
    /// traffic is translated per packet, so a service mesh in the pod sees the Service
    /// address.
    HostOnly,
    /// None: the hooks are detached, the node's own processes cannot reach Services.
    Off,
}

#[derive(Args, Clone)]
struct SocketArgs {
    /// Socket-level load balancing: cgroup hooks translate a Service address when a socket
    /// connects (or an unconnected UDP socket sends), once, instead of every packet; they
    /// serve the node's own processes (which no packet hook sees) and NodePorts on
    /// 127.0.0.1.
    #[arg(long, value_enum, default_value_t = SocketLb::All)]
    socket_lb: SocketLb,
    /// The cgroup v2 directory the socket hooks attach to: processes under it are served
    /// (default: where cgroup v2 is mounted, the root of every process of the node).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
}

impl SocketArgs {
    /// The socket hooks' settings, None when off; the cgroup is checked even then, so a
    /// mistyped path is reported.
    fn resolve(&self) -> Result<Option<agent::SocketLb>, datapath::sockets::CgroupError> {
        let off = self.socket_lb == SocketLb::Off;
        if off && self.cgroup_root.is_none() {
            return Ok(None);
        }
        let cgroup_root = datapath::sockets::cgroup_root(self.cgroup_root.as_deref())?;
        let mode = match self.socket_lb {
            SocketLb::All => lb_common::sock_mode::ALL,
            SocketLb::HostOnly => lb_common::sock_mode::HOST_ONLY,
            SocketLb::Off => return Ok(None),
        };
        Ok(Some(agent::SocketLb { mode, cgroup_root }))
    }
}

/// Where the agent's Services come from: exactly one of manifests (standalone mode), a
/// kubeconfig or an API server URL (cluster mode); with none of them, in a pod, the pod's
/// in-cluster configuration.
#[derive(Args, Clone)]
#[group(multiple = false)]
struct SourceArgs {
    /// Standalone mode: serve the Services of these manifests (a file or a directory, read
    /// again when they change).
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Cluster mode: reach the API server as this kubeconfig's current context says.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Cluster mode: reach the API server at this URL, with the pod's service account
    /// credentials when there are any. A kube-proxy replacement cannot reach the API
    /// through the `kubernetes` Service before it has programmed that Service: give the
    /// API server's own address.
    #[arg(long)]
    api_server: Option<String>,
}

impl SourceArgs {
    fn source(self) -> anyhow::Result<agent::Source> {
        use lb_user::source::cluster::ApiServer;
        Ok(match (self.manifests, self.kubeconfig, self.api_server) {
            (Some(path), _, _) => agent::Source::Manifests(path),
            (_, Some(path), _) => agent::Source::Cluster(ApiServer::Kubeconfig(path)),
            (_, _, Some(url)) => agent::Source::Cluster(ApiServer::Url(url)),
            (None, None, None) if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                agent::Source::Cluster(ApiServer::InCluster)
            }
            (None, None, None) => bail!(
                "no source of Services: give --manifests PATH (standalone mode), or --kubeconfig PATH or \
                 --api-server URL (cluster mode); in a pod (KUBERNETES_SERVICE_HOST set) the in-cluster \
                 configuration is the default"
            ),
        })
    }
}

/// This node. What is not given here comes from the `kind: Node` object of this name
/// (among the manifests, or watched on the API server: addresses from status.addresses,
/// zone from its topology.kubernetes.io/zone label); there are no defaults.
#[derive(Args, Clone)]
struct NodeArgs {
    /// This node's name: matched against endpoints' nodeName, and names its Node object.
    /// A DaemonSet sets NODE_NAME from spec.nodeName.
    #[arg(long, env = "NODE_NAME", required = true)]
    node_name: String,
    /// This node's addresses (NodePorts open on them; the first is the SNAT address).
    #[arg(long = "node-address")]
    node_addresses: Vec<Ipv4Addr>,
    /// This node's zone, for topology hints.
    #[arg(long)]
    zone: Option<String>,
    /// Open NodePorts only on node addresses in these CIDRs (default: all).
    #[arg(long)]
    nodeport_addresses: Vec<Ipv4Net>,
    /// How new flows choose their backend where a Service does not say (annotation
    /// lb.kube-xdp.io/algorithm): random, round-robin, maglev, source-hash or least-conn.
    #[arg(long, default_value = "random", value_parser = model::Algorithm::parse)]
    algorithm: model::Algorithm,
}

/// Which sources are pods (kube-proxy's detect-local): their ClusterIP traffic keeps its
/// source address, anyone else's is SNATed. Without either option, the Node object's
/// spec.podCIDRs (as --node-pod-cidr).
#[derive(Args, Clone)]
#[group(multiple = false)]
struct LocalArgs {
    /// Every pod of the cluster is in this CIDR (detect-local mode ClusterCIDR).
    #[arg(long)]
    cluster_cidr: Option<Ipv4Net>,
    /// This node's pods are in this CIDR (detect-local mode NodeCIDR).
    #[arg(long)]
    node_pod_cidr: Option<Ipv4Net>,
}

impl NodeArgs {
    fn flags(&self, local: Option<LocalArgs>) -> model::NodeFlags {
        let local_detect = local.and_then(|l| {
            l.cluster_cidr
                .map(|c| model::LocalDetect::ClusterCidr(c.trunc()))
                .or(l.node_pod_cidr.map(|c| model::LocalDetect::NodeCidr(c.trunc())))
        });
        model::NodeFlags {
            name: self.node_name.clone(),
            addresses: self.node_addresses.clone(),
            zone: self.zone.clone(),
            local_detect,
        }
    }
    /// `localhost_node_ports`: the socket hooks are on to serve them.
    fn options(&self, localhost_node_ports: bool) -> model::Options {
        model::Options {
            nodeport_addresses: self.nodeport_addresses.iter().map(Ipv4Net::trunc).collect(),
            default_algorithm: self.algorithm,
            localhost_node_ports,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(ns) = &cli.netns {
        netns::enter(ns)?;
    }
    match cli.command {
        Command::Load { pin, capacity, iface, pod_iface } => {
            let mut dp = datapath::Datapath::load(&pin.pin_dir, capacity.capacity())?;
            for i in &iface {
                dp.attach_uplink(i).with_context(|| format!("attaching XDP to {i}"))?;
            }
            for i in &pod_iface {
                dp.attach_pod_device(i).with_context(|| format!("attaching tc to {i}"))?;
            }
            println!("loaded; pinned under {}", pin.pin_dir.display());
        }
        Command::Agent {
            pin,
            source,
            node,
            healthz_bind_address,
            local,
            iface,
            pod_devices,
            snat_ports,
            datapath,
            sockets,
            metrics_bind_address,
            metrics_endpoint_series,
            drift_check_interval,
        } => {
            let source = source.source()?;
            let sockets = sockets.resolve()?;
            let mut patterns = GlobSetBuilder::new();
            for g in pod_devices {
                patterns.add(g);
            }
            let cfg = agent::AgentConfig {
                pin_dir: pin.pin_dir,
                source,
                node: node.flags(Some(local)),
                healthz_bind: healthz_bind_address,
                options: node.options(sockets.is_some()),
                uplinks: iface,
                pod_devices: patterns.build().context("--pod-devices")?,
                snat_ports,
                datapath: datapath.options(),
                sockets,
                metrics_bind_address: metrics_bind_address.0,
                metrics_endpoint_series,
                drift_check: std::time::Duration::from_secs(drift_check_interval),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(agent::run(cfg, shutdown_signal()))?;
        }
        Command::Unload { pin } => {
            datapath::unload(&pin.pin_dir)?;
            println!("unloaded {}", pin.pin_dir.display());
        }
        Command::Counters { pin, output } => print_counters(&pin.pin_dir, output.json)?,
        Command::Services { pin, output, model } => services(&pin.pin_dir, output.json, model)?,
        Command::Stats { pin, output, watch, interval, count } => {
            stats(&pin.pin_dir, output.json, watch, interval, count)?
        }
        Command::Ct { pin, output, service, backend } => {
            let filter = telemetry::views::FlowFilter { service, backend };
            let flows = telemetry::views::flows(&pin.pin_dir, &filter)?;
            if output.json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
            } else {
                print!("{}", render::flows(&flows));
            }
        }
        Command::Status { pin, output } => {
            let status = telemetry::status::StatusView::read(&pin.pin_dir)?;
            if output.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render::status(&status));
            }
        }
        Command::Sockets { pin } => {
            print!("{}", lb_user::cli::show::sockets(&datapath::sockets::connections(&pin.pin_dir)?));
        }
        Command::Which { pin, proto, src, dst } => {
            datapath::check_pin_dir(&pin.pin_dir)?;
            let prediction =
                datapath::predict::Predictor::open(&pin.pin_dir)?.predict(datapath::predict::Flow { proto, src, dst });
            println!("{prediction}");
        }
        Command::Model { manifests, node } => {
            let (objects, report) = source::read_manifests(&manifests);
            let info = node.flags(None).node_info(&objects.nodes)?;
            let desired = model::desired_state(&objects, &info, &node.options(false));
            print!("{}", lb_user::cli::show::desired(&desired));
            for e in report.errors.iter().map(|e| e.to_string()).chain(desired.errors.iter().map(|e| e.to_string())) {
                eprintln!("error: {e}");
            }
            if !report.errors.is_empty() || !desired.errors.is_empty() {
                bail!("some objects could not be used in full (see errors above); the rest are shown");
            }
        }
    }
    Ok(())
}

fn print_counters(pin_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    datapath::check_pin_dir(pin_dir)?;
    let counters = datapath::read_counters(pin_dir)?;
    if json {
        let all: serde_json::Map<String, serde_json::Value> = counters
            .iter()
            .map(|(label, c)| (label.to_string(), serde_json::json!({"packets": c.packets, "bytes": c.bytes})))
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for (label, c) in counters {
        println!("{label:<28} {:>12} packets {:>14} bytes", c.packets, c.bytes);
    }
    Ok(())
}

fn services(pin_dir: &std::path::Path, json: bool, m: ModelArgs) -> anyhow::Result<()> {
    let snap = telemetry::views::Snapshot::read(pin_dir)?;
    let drift = match m.node() {
        None => None,
        Some((manifests, node)) => {
            let (objects, report) = source::read_manifests(&manifests);
            let info = node.flags(None).node_info(&objects.nodes)?;
            // 127.0.0.1 NodePorts are in the maps when the socket hooks serve them.
            let sockets_on = datapath::sockets::mode(pin_dir)? != lb_common::sock_mode::OFF;
            let desired = model::desired_state(&objects, &info, &node.options(sockets_on));
            for e in report.errors.iter().map(|e| e.to_string()).chain(desired.errors.iter().map(|e| e.to_string())) {
                eprintln!("warning: {e}");
            }
            Some(lb_user::reconcile::drift::drift(&desired, &snap.maps, m.maglev.size()))
        }
    };
    let view = telemetry::views::services(&snap, drift);
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", render::services(&view));
    }
    Ok(())
}

/// One reading, or two an interval apart (rates), or readings every interval until Ctrl-C.
fn stats(
    pin_dir: &std::path::Path,
    json: bool,
    watch: bool,
    interval: Option<f64>,
    count: Option<u32>,
) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    use telemetry::views::{stats as view, Snapshot};
    let print = |v: &telemetry::views::StatsView, watching: bool| -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", if watching { serde_json::to_string(v)? } else { serde_json::to_string_pretty(v)? })?;
        } else {
            if watching && std::io::stdout().is_terminal() {
                // Home and clear: the next reading replaces this one in place.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            write!(out, "{}", render::stats(v))?;
        }
        out.flush()?;
        Ok(())
    };
    let first = Snapshot::read(pin_dir)?;
    let Some(seconds) = interval.or(watch.then_some(2.0)) else {
        return print(&view(&first, None), false);
    };
    let period = std::time::Duration::from_secs_f64(seconds);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        // One stream for the whole run: a Ctrl-C while a reading is taken is not lost.
        let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut before = first;
        let mut readings = 1;
        if watch {
            print(&view(&before, None), true)?;
        }
        loop {
            tokio::select! {
                _ = interrupt.recv() => return Ok(()),
                () = tokio::time::sleep(period) => {}
            }
            let now = Snapshot::read(pin_dir)?;
            print(&view(&now, Some(&before)), watch)?;
            readings += 1;
            if !watch || count.is_some_and(|c| readings >= c) {
                return Ok(());
            }
            before = now;
        }
    })
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0.1 to 3600")),
    }
}

fn parse_service_name(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

/// An address to serve on; None: off.
#[derive(Clone, Copy)]
struct BindAddress(Option<std::net::SocketAddr>);

fn parse_bind_address(s: &str) -> Result<BindAddress, String> {
    telemetry::metrics::parse_bind_address(s).map(BindAddress)
}

fn parse_glob(s: &str) -> Result<Glob, String> {
    Glob::new(s).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected MIN-MAX"))?;
    let lo: u16 = lo.parse().map_err(|e| format!("{lo:?}: {e}"))?;
    let hi: u16 = hi.parse().map_err(|e| format!("{hi:?}: {e}"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: need 1 <= MIN <= MAX"));
    }
    Ok((lo, hi))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
