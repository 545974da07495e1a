//! Builds the kernel object and places it in OUT_DIR, where `include_bytes!` embeds it.
fn main() {
    let root = xtask::workspace_root();
    for input in xtask::ebpf_inputs(&root) {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    println!("cargo:rerun-if-env-changed=PATH");
    let object = xtask::build_ebpf(&root).unwrap_or_else(|e| panic!("{e}"));
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::copy(&object, out.join("lb-ebpf.o")).unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
}
