//! The agent as a process in a lab node, the way operators run it; stopped and its
//! pinned datapath removed on drop.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::lab::{in_netns, Node, CLUSTER_CIDR};

/// The lb-user binary: $LB_USER_BIN, or beside the running executable's target dir.
pub fn lb_user_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_USER_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("lb-user");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "lb-user binary not found next to {}; build it first (`cargo build -p lb-user`) or set LB_USER_BIN",
        exe.display()
    )
}

pub struct Agent {
    child: Child,
    /// What runs lb-user (a wrapper that confines it), empty to run it directly.
    launcher: Vec<String>,
    args: Vec<String>,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
    /// The node's namespace (the health server listens there).
    netns: String,
}

/// Where a cluster-mode agent serves /healthz, /livez and /readyz, inside its node's
/// namespace (kube-proxy's port).
pub const HEALTHZ_PORT: u16 = 10256;

impl Agent {
    /// Starts the agent for `node` on `manifests` and waits for its first sync.
    pub fn start(node: &Node, manifests: &Path, extra_args: &[&str]) -> Result<Agent> {
        let agent = Agent::start_with(Vec::new(), node, standalone(node, manifests), extra_args)?;
        agent.wait_for_syncs(1)?;
        Ok(agent)
    }

    /// Starts the agent for `node` in cluster mode, watching the API server at `api_url`
    /// (its addresses, zone and pod CIDRs come from its Node object there), and waits
    /// until it reports ready (`/readyz`: first complete sync, datapath attached).
    pub fn start_cluster(node: &Node, api_url: &str, extra_args: &[&str]) -> Result<Agent> {
        let agent = Agent::spawn_cluster(node, api_url, extra_args)?;
        agent.wait_until_ready(Duration::from_secs(30))?;
        Ok(agent)
    }

    /// [`Agent::start_cluster`] without waiting for anything.
    pub fn spawn_cluster(node: &Node, api_url: &str, extra_args: &[&str]) -> Result<Agent> {
        let source = ["--api-server", api_url, "--healthz-bind-address", &format!("127.0.0.1:{HEALTHZ_PORT}")];
        Agent::start_with(Vec::new(), node, source.map(String::from).to_vec(), extra_args)
    }

    /// Starts it as `start` does, in `node`'s namespace with only these capabilities (names
    /// as setpriv takes them: `bpf`, `net_admin`...) in its bounding set, so it can never
    /// hold any other, root or not.
    pub fn start_confined(node: &Node, manifests: &Path, capabilities: &[&str], extra_args: &[&str]) -> Result<Agent> {
        let bounding: String = capabilities.iter().map(|c| format!(",+{c}")).collect();
        let launcher = [
            "nsenter".to_string(),
            format!("--net=/run/netns/{}", node.ns.name),
            "--".into(),
            "setpriv".into(),
            format!("--bounding-set=-all{bounding}"),
            "--inh-caps=-all".into(),
            "--".into(),
        ];
        let agent = Agent::start_with(launcher.to_vec(), node, standalone(node, manifests), extra_args)?;
        agent.wait_for_syncs(1)?;
        Ok(agent)
    }

    /// Spawns the agent with `source` (where its Services come from) and the lab's
    /// options for `node`; waits for nothing.
    fn start_with(launcher: Vec<String>, node: &Node, source: Vec<String>, extra_args: &[&str]) -> Result<Agent> {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", node.ns.name));
        let log = std::env::temp_dir().join(format!("{}-agent.log", node.ns.name));
        // Entering the namespace takes CAP_SYS_ADMIN: a launcher enters it for the agent.
        let netns = if launcher.is_empty() { vec!["--netns".to_string(), node.ns.name.clone()] } else { Vec::new() };
        let mut args: Vec<String> = netns.into_iter().chain(["agent", "--pin-dir"].map(String::from)).collect();
        args.push(pin_dir.display().to_string());
        args.extend(source);
        args.extend(["--node-name", &node.name, "--iface", node.uplink].map(String::from));
        args.extend(["--pod-devices", "veth*", "--cluster-cidr", CLUSTER_CIDR].map(String::from));
        // The socket hooks only where a test gives them a cgroup of its own: their default
        // is the machine's cgroup root, which no test may touch.
        if !extra_args.contains(&"--socket-lb") {
            args.extend(["--socket-lb", "off"].map(String::from));
        }
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let child = spawn(&launcher, &args, &log)?;
        Ok(Agent { child, launcher, args, pin_dir, log, netns: node.ns.name.clone() })
    }

    /// The HTTP status of `GET path` on the agent's health server (inside its node's
    /// namespace), `None` when nothing answers.
    pub fn health(&self, path: &str) -> Option<u16> {
        self.health_answer(path).map(|(status, _)| status)
    }

    /// The health server's answer to `path`: its status and its body.
    pub fn health_answer(&self, path: &str) -> Option<(u16, String)> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        in_netns(&self.netns, move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", HEALTHZ_PORT)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            stream.write_all(request.as_bytes()).ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).ok()?;
            // "HTTP/1.1 200 OK\r\n...\r\n\r\nbody"
            let status = text.get(9..12)?.parse().ok()?;
            Some((status, text.split_once("\r\n\r\n")?.1.to_string()))
        })
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_until_ready(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.health("/readyz") == Some(200) {
                return Ok(());
            }
            if self.log_text().contains("Error") {
                bail!("agent failed:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("agent not ready (/readyz) within {limit:?}:\n{}", self.log_text())
    }

    /// Stops the agent (leaving its pinned datapath running, as an upgrade or a crash
    /// would) and starts it again; waits for the new process's first sync.
    pub fn restart(&mut self) -> Result<()> {
        let before = self.syncs();
        self.respawn()?;
        self.wait_for_syncs(before + 1)
    }

    /// Restarts the agent (as `restart`) with `option`'s value changed to `value`.
    pub fn restart_setting(&mut self, option: &str, value: &str) -> Result<()> {
        let at = self.args.iter().rposition(|a| a == option).with_context(|| format!("no {option} to change"))?;
        self.args[at + 1] = value.to_string();
        self.restart()
    }

    /// Sends `signal` (SIGKILL: a crash or an OOM kill; SIGTERM: a rollout), waits for the
    /// process to end, starts it again and waits for the new process's first sync.
    pub fn kill_and_restart(&mut self, signal: i32) -> Result<()> {
        let before = self.syncs();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.child.wait()?;
        self.child = spawn(&self.launcher, &self.args, &self.log)?;
        self.wait_for_syncs(before + 1)
    }

    /// Stops and starts the agent without waiting for anything.
    pub fn respawn(&mut self) -> Result<()> {
        self.stop();
        self.child = spawn(&self.launcher, &self.args, &self.log)?;
        Ok(())
    }

    fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most 20 s) until the agent has synced its maps `n` times in all.
    pub fn wait_for_syncs(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let text = self.log_text();
            if text.matches("maps synced").count() >= n {
                return Ok(());
            }
            if text.contains("Error") {
                bail!("agent failed:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("agent did not sync {n} times within 20 s:\n{}", self.log_text())
    }

    /// Waits (at most 10 s) for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("agent log has no {needle:?}:\n{}", self.log_text())
    }

    /// A datapath counter (`lb_common::counters`), summed over CPUs.
    pub fn counter(&self, index: u32) -> u64 {
        crate::counter(&self.pin_dir, lb_common::counters::ALL[index as usize].1)
    }

    pub fn syncs(&self) -> usize {
        self.log_text().matches("maps synced").count()
    }
}

/// The standalone source: `manifests`, and the node's address on the command line.
fn standalone(node: &Node, manifests: &Path) -> Vec<String> {
    let source = ["--manifests", &manifests.display().to_string(), "--node-address", &node.addr.to_string()];
    source.map(String::from).to_vec()
}

/// Starts lb-user with `args` (through `launcher`, if any), its log appended to `log`.
fn spawn(launcher: &[String], args: &[String], log: &Path) -> Result<Child> {
    let log_file = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let lb_user = lb_user_bin()?;
    let mut command = match launcher.split_first() {
        Some((program, launcher_args)) => {
            let mut c = Command::new(program);
            c.args(launcher_args).arg(lb_user);
            c
        }
        None => Command::new(lb_user),
    };
    command
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .context("starting lb-user agent")
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = lb_user::datapath::unload(&self.pin_dir);
        let _ = fs::remove_file(&self.log);
    }
}
