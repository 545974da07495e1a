//! Builds the kernel object and places it in OUT_DIR, where `include_bytes!` embeds it;
//! with LB_EBPF_STUB set, an empty stub instead (see lb-build).
fn main() {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("lb-ebpf.o");
    println!("cargo:rerun-if-env-changed={}", lb_build::STUB_VAR);
    if lb_build::stub_requested() {
        std::fs::write(&out, b"").unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
        return;
    }
    let root = lb_build::workspace_root();
    for input in lb_build::ebpf_inputs(&root) {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    println!("cargo:rerun-if-env-changed=PATH");
    let object = lb_build::build_ebpf(&root).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(&object, &out).unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
}
