//! The kernel-side programs, built for `bpfel-unknown-none` by the daemon's `build.rs`.
//!
//! On the host this file compiles to an empty binary so `cargo clippy --workspace` works.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod capture;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod segments;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
