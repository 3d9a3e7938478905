//! Builds the BPF programs (lb-ebpf) and leaves the objects in OUT_DIR for
//! `include_bytes_aligned!`. The toolchain `gpulb-bpf` is Debian's rustc with rust-src
//! (`cargo xtask` links it; see DEVELOPERS.md); `.cargo/config.toml` sets RUSTC_BOOTSTRAP
//! so that aya-build passes `-Z build-std=core`.
use std::path::Path;

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest.join("../lb-ebpf");
    let common_dir = manifest.join("../lb-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir.to_str().expect("workspace path is UTF-8");
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom("gpulb-bpf"),
    )
}
