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
    /// Per-packet cost of the XDP program next to an empty one (BPF_PROG_TEST_RUN).
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
            run(cargo(&root)
                .args(["test", "--workspace", "--exclude", "lb-ebpf"])
                .env("LB_USER_BIN", bin(&root, "lb-user")))?;
            run(&mut Command::new(bin(&root, "bench")))
        }
        Task::Bench => {
            setup()?;
            build(&root)?;
            run(&mut Command::new(bin(&root, "bench")))
        }
    }
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
const PACKAGES: &[&str] = &["llvm-22-dev", "iproute2", "ethtool", "bpftool", "procps", "nftables"];
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
