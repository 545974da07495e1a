//! The eBPF build recipe, shared by `cargo xtask build-ebpf` and lb-user's build script
//! (so a plain `cargo build` embeds a fresh object). std only: it runs in build scripts.
//!
//! `LB_EBPF_STUB=1` makes lb-user embed an empty object instead, so the model, reconciler
//! and agent logic build and unit-test on a machine without the eBPF toolchain; such a
//! binary refuses to load a datapath.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

pub const EBPF_TARGET: &str = "bpfel-unknown-none";
/// Debian's compiler and its matching library source (TOOLCHAIN.md).
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";

/// How the kernel-side crate gets compiled: a nightly with `rust-src`, or Debian's
/// `rustc-web` (stable, so unstable flags need RUSTC_BOOTSTRAP=1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EbpfToolchain {
    RustupNightly,
    DebianRustcWeb,
}

impl EbpfToolchain {
    /// Prefers a nightly that has rust-src; otherwise Debian's rustc-web if installed.
    pub fn detect() -> Option<Self> {
        if nightly_has_rust_src() {
            return Some(Self::RustupNightly);
        }
        if Path::new(DEBIAN_RUSTC).exists() && Path::new(DEBIAN_RUST_SRC).exists() {
            return Some(Self::DebianRustcWeb);
        }
        None
    }

    fn cargo(&self) -> Command {
        let mut cmd = match self {
            Self::RustupNightly => {
                let mut c = Command::new("rustup");
                c.args(["run", "nightly", "cargo"]);
                c
            }
            Self::DebianRustcWeb => {
                let mut c = Command::new(DEBIAN_CARGO);
                c.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
                c
            }
        };
        // Variables a parent cargo (or rustup) sets for itself must not leak into the
        // nested build, which uses another compiler and target.
        for var in [
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_MAKEFLAGS",
            "RUSTUP_TOOLCHAIN",
            "CARGO",
        ] {
            if !(var == "RUSTC" && *self == Self::DebianRustcWeb) {
                cmd.env_remove(var);
            }
        }
        cmd
    }
}

fn nightly_has_rust_src() -> bool {
    let Ok(out) = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output() else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot).join("lib/rustlib/src/rust/library/core").exists()
}

/// Set (to anything but `0` or empty) to embed an empty object instead of building one.
pub const STUB_VAR: &str = "LB_EBPF_STUB";

/// Whether this build asked for the empty stub object.
pub fn stub_requested() -> bool {
    env::var(STUB_VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The workspace root (this crate lives in `<root>/lb-build`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("lb-build has a parent").to_path_buf()
}

/// Builds `lb-ebpf` in release mode (BTF on) into its own target dir under `target/`
/// (a nested cargo must not wait on the parent's lock) and returns the object's path.
pub fn build_ebpf(root: &Path) -> Result<PathBuf, String> {
    let toolchain = EbpfToolchain::detect().ok_or_else(|| {
        "no eBPF toolchain: need a rustup nightly with rust-src, or Debian's rustc-web + \
         rust-web-src; run `cargo xtask setup`"
            .to_string()
    })?;
    let target_dir = root.join("target").join("ebpf");
    let mut cmd = toolchain.cargo();
    cmd.current_dir(root.join("lb-ebpf"))
        .args(["build", "--release", "--package", "lb-ebpf", "--target", EBPF_TARGET])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // BTF for maps and programs, so bpftool prints named fields.
        // BPF v3 for the conntrack's compare-and-swap and fetching atomics (kernel 5.12+).
        // LLVM's own memset/memcpy lowering (word stores where alignment allows): with
        // bpf-linker's default in-order expansion every zeroed struct became a call to a
        // byte-loop memset, a quarter of the pass-through path's time.
        // The workspace's release profile builds the agent as one LTO unit; the eBPF object
        // keeps cargo's defaults, as measured (lb-ebpf's own package settings still apply).
        .env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf", "-Clink-arg=--disable-expand-memcpy-in-order", "-Ctarget-cpu=v3"]
                .join("\x1f"),
        );
    let status = cmd.status().map_err(|e| format!("running cargo for {toolchain:?}: {e}"))?;
    if !status.success() {
        return Err(format!("building lb-ebpf with {toolchain:?} failed ({status})"));
    }
    Ok(target_dir.join(EBPF_TARGET).join("release").join("lb-ebpf"))
}

/// Files whose change must rebuild the object: the kernel crate and the shared ABI.
pub fn ebpf_inputs(root: &Path) -> Vec<PathBuf> {
    let mut v = vec![root.join("Cargo.lock")];
    for dir in ["lb-ebpf", "lb-common"] {
        v.push(root.join(dir).join("Cargo.toml"));
        v.push(root.join(dir).join("src"));
    }
    v
}

/// bpf-linker must be on PATH for the kernel crate to link.
pub fn bpf_linker_on_path() -> bool {
    env::var_os("PATH").map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file())).unwrap_or(false)
}
