//! Builds the eBPF programs of `selfheal-ebpf` for the BPF target (nightly + bpf-linker, both
//! installed by `cargo xtask setup`) and leaves the object in `OUT_DIR` for
//! `include_bytes_aligned!`.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "selfheal-ebpf")
        .ok_or_else(|| anyhow!("the selfheal-ebpf package is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent directory for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Package::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF programs (run `cargo xtask setup` if nightly, rust-src or bpf-linker is missing)")
}
