//! Developer and CI tasks: `cargo xtask <task>`.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lb_build::{bpf_linker_on_path, build_ebpf, workspace_root, EbpfToolchain};

#[derive(Parser)]
#[command(name = "xtask", about = "Tasks for the kube-xdp-lb workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh Debian machine lacks (packages, bpf-linker); a no-op when done.
    Setup,
    /// Build the eBPF object (bpfel-unknown-none, with BTF).
    BuildEbpf,
    /// Build the eBPF object and the userspace binaries (which embed it).
    Build,
    /// Build, then load and attach to an interface, pinning under the pin dir.
    BuildAndLoad {
        #[arg(long, required = true)]
        iface: Vec<String>,
        #[arg(long)]
        pod_iface: Vec<String>,
        #[arg(long)]
        netns: Option<String>,
        #[arg(long, default_value = "/sys/fs/bpf/kube-xdp-lb")]
        pin_dir: String,
    },
    /// Detach and unpin what build-and-load pinned.
    Unload {
        #[arg(long, default_value = "/sys/fs/bpf/kube-xdp-lb")]
        pin_dir: String,
    },
    /// Build (`up`) or remove (`down`) the standard lab of network namespaces.
    Lab {
        #[arg(value_parser = ["up", "down"])]
        action: String,
    },
    /// The live demo: a lab, the agent on each node with examples/, real traffic.
    Demo,
    /// Everything CI runs: setup, build, unit and integration tests (needs root), then the
    /// benchmark's table for the record.
    Test,
    /// Per-packet cost of the XDP program next to an empty one (BPF_PROG_TEST_RUN), then the
    /// end-to-end request rates (direct, ClusterIP per packet, ClusterIP at the socket) and
    /// the conntrack sweep over 1M entries; then the control plane's (bench_control, release
    /// builds of it and of the agent): network programming latency at 1k and 10k Services,
    /// the first full sync of 10k with the RSS.
    Bench,
}

fn main() -> Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::BuildEbpf => {
            let object = build_ebpf(&root).map_err(anyhow::Error::msg)?;
            println!("eBPF object: {}", object.display());
            Ok(())
        }
        Task::Build => build(&root),
        Task::BuildAndLoad { iface, pod_iface, netns, pin_dir } => {
            build(&root)?;
            let mut args: Vec<String> = Vec::new();
            if let Some(ns) = netns {
                args.extend(["--netns".into(), ns]);
            }
            args.extend(["load".into(), "--pin-dir".into(), pin_dir]);
            for i in iface {
                args.extend(["--iface".into(), i]);
            }
            for i in pod_iface {
                args.extend(["--pod-iface".into(), i]);
            }
            run(Command::new(bin(&root, "lb-user")).args(&args))
        }
        Task::Unload { pin_dir } => run(Command::new(bin(&root, "lb-user")).args(["unload", "--pin-dir", &pin_dir])),
        Task::Lab { action } => {
            build(&root)?;
            run(Command::new(bin(&root, "lab")).arg(action))
        }
        Task::Demo => {
            setup()?;
            build(&root)?;
            run(Command::new(bin(&root, "demo")).arg(root.join("examples")).current_dir(&root))
        }
        Task::Test => {
            setup()?;
            build(&root)?;
            run_tests(&root)?;
            run(&mut Command::new(bin(&root, "bench")))
        }
        Task::Bench => {
            setup()?;
            build(&root)?;
            // All run whatever the others' outcome: each prints why a row was refused.
            let per_packet = run(&mut Command::new(bin(&root, "bench")));
            let end_to_end = run(&mut Command::new(bin(&root, "bench_e2e")));
            // The control plane's figures are the agent's own: measured with the optimised
            // build a DaemonSet ships, against an optimised API server stand-in (a debug one
            // takes most of a first sync's time serving its lists, on the agent's CPUs).
            let release = root.join("target").join("release");
            let control = run(cargo(&root).args([
                "build",
                "--release",
                "--package",
                "lb-user",
                "--package",
                "lb-tests",
                "--bin",
                "lb-user",
                "--bin",
                "bench_control",
            ]))
            .and_then(|()| {
                run(Command::new(release.join("bench_control")).env("LB_USER_BIN", release.join("lb-user")))
            });
            per_packet.and(end_to_end).and(control)
        }
    }
}

/// The test binaries whose run is longest and mostly CPU: they get a lane of their own,
/// beside the labs (which mostly wait on the network and timers), so the whole suite takes
/// the longest lane's time rather than the sum.
const OWN_LANE: &[&str] = &["properties"];

/// Builds every test binary, then runs them in two lanes: the CPU-bound property tests on
/// one, every other binary in turn on the other. Each binary's output is printed whole when
/// it ends; any failure fails the run, after both lanes finished.
fn run_tests(root: &Path) -> Result<()> {
    let out = cargo(root)
        .args(["test", "--workspace", "--exclude", "lb-ebpf", "--no-run", "--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the tests")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let mut binaries: Vec<(String, PathBuf)> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str()) else { continue };
        if msg["profile"]["test"].as_bool() == Some(true) {
            binaries.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    let (own, shared): (Vec<_>, Vec<_>) = binaries.into_iter().partition(|(n, _)| OWN_LANE.contains(&n.as_str()));
    let lb_user = bin(root, "lb-user");
    let lane = |tests: Vec<(String, PathBuf)>| {
        let lb_user = lb_user.clone();
        std::thread::spawn(move || {
            let mut failed = Vec::new();
            for (name, exe) in tests {
                let started = std::time::Instant::now();
                let result = Command::new(&exe).env("LB_USER_BIN", &lb_user).output();
                let took = started.elapsed().as_secs_f64();
                let ok = result.as_ref().is_ok_and(|o| o.status.success());
                // One binary's output at a time, whole.
                let stdout = std::io::stdout();
                let mut lock = stdout.lock();
                match &result {
                    Ok(o) => {
                        use std::io::Write;
                        let _ = lock.write_all(&o.stdout);
                        let _ = lock.write_all(&o.stderr);
                    }
                    Err(e) => println!("running {}: {e}", exe.display()),
                }
                println!("== {name}: {} in {took:.1} s\n", if ok { "ok" } else { "FAILED" });
                if !ok {
                    failed.push(name);
                }
            }
            failed
        })
    };
    let lanes = [lane(own), lane(shared)];
    let failed: Vec<String> =
        lanes.into_iter().flat_map(|l| l.join().unwrap_or_else(|_| vec!["a lane".into()])).collect();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

fn cargo(root: &Path) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root);
    c
}

fn bin(root: &Path, name: &str) -> PathBuf {
    root.join("target").join("debug").join(name)
}

fn build(root: &Path) -> Result<()> {
    let object = build_ebpf(root).map_err(anyhow::Error::msg)?;
    println!("eBPF object: {}", object.display());
    run(cargo(root).args(["build", "--package", "lb-user", "--package", "lb-tests"]))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Debian packages the build, the tests and the demo use.
/// (prometheus: promtool, which checks the agent's /metrics in the lab tests.)
const PACKAGES: &[&str] = &["llvm-22-dev", "iproute2", "ethtool", "bpftool", "procps", "nftables", "prometheus"];
/// Debian's compiler + matching library source, used when no nightly has rust-src.
const DEBIAN_RUST: &[&str] = &["rustc-web", "rust-web-src"];

fn setup() -> Result<()> {
    let mut wanted: Vec<&str> = PACKAGES.to_vec();
    let have_nightly_src = EbpfToolchain::detect() == Some(EbpfToolchain::RustupNightly);
    if !have_nightly_src {
        wanted.extend(DEBIAN_RUST);
    }
    let missing: Vec<&str> = wanted.into_iter().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        println!("setup: Debian packages present");
    } else {
        println!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    println!(
        "setup: eBPF toolchain: {:?}",
        EbpfToolchain::detect().context("no eBPF toolchain after installing packages")?
    );
    if bpf_linker_on_path() {
        println!("setup: bpf-linker present");
    } else {
        println!("setup: installing bpf-linker 0.13.0 against LLVM 22");
        let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", "0.13.0", "--no-default-features", "--features", "llvm-22"])
            .env("PATH", path))?;
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}
