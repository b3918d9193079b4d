//! With the `cuda` feature: compiles `cuda/brigade.cu` with nvcc into PTX (embedded by
//! `src/cuda.rs`) for `CUDA_COMPUTE_CAP` (default 90, the H100/H200), and into a cubin whose
//! `ptxas -v` report must show no register spills. Without the feature it does nothing.
//! nvcc comes from `$CUDA_PATH/bin` or `PATH` (`../shared/cuda/toolchain.sh` sets both).
//! It also fails the build when an op named in `src/cuda.rs`'s `OPS` (the ops launched from
//! Rust) lacks its `_f32` or `_bf16` entry in the PTX, or the PTX holds an entry no op
//! names, so `cargo check --features cuda` catches a misnamed kernel without a GPU.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=cuda/brigade.cu");
    println!("cargo::rerun-if-changed=src/cuda.rs");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_PATH");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = env::var("CUDA_PATH")
        .map(|p| PathBuf::from(p).join("bin/nvcc"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    let common = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"];
    let run = |args: &[&str]| {
        let o = Command::new(&nvcc).args(common).args(args).arg("cuda/brigade.cu").output().unwrap_or_else(|e| {
            panic!("cannot run nvcc ({}): {e}; run `eval \"$(../shared/cuda/toolchain.sh)\"` first", nvcc.display())
        });
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        if !o.status.success() {
            panic!("nvcc {args:?} failed:\n{log}");
        }
        log
    };
    let ptx = out.join("brigade.ptx");
    run(&["--ptx", &format!("-arch=compute_{cap}"), "-o", ptx.to_str().expect("utf-8 OUT_DIR")]);
    check_kernel_names(&std::fs::read_to_string(&ptx).expect("nvcc wrote the PTX"));
    let cubin = out.join("brigade.cubin");
    let report =
        run(&["--cubin", &format!("-arch=sm_{cap}"), "-Xptxas", "-v", "-o", cubin.to_str().expect("utf-8 OUT_DIR")]);
    let spills: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads"))
        .collect();
    if !spills.is_empty() {
        panic!("ptxas reports register spills in brigade's kernels:\n{}", spills.join("\n"));
    }
}

/// The `OPS` list of `src/cuda.rs` against the PTX's `.entry` names, both ways.
fn check_kernel_names(ptx: &str) {
    let source = std::fs::read_to_string("src/cuda.rs").expect("kernels/src/cuda.rs exists");
    let list = source
        .split_once("pub const OPS: &[&str] = &[")
        .and_then(|(_, rest)| rest.split_once("];"))
        .map(|(list, _)| list)
        .expect("src/cuda.rs declares `pub const OPS: &[&str] = &[...];`");
    let ops: Vec<&str> = list.split(',').map(|s| s.trim().trim_matches('"')).filter(|s| !s.is_empty()).collect();
    let mut wanted: Vec<String> = ops.iter().flat_map(|op| [format!("{op}_f32"), format!("{op}_bf16")]).collect();
    let mut entries: Vec<String> = ptx
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .map(|l| l.split('(').next().unwrap_or("").trim().to_string())
        .collect();
    wanted.sort();
    entries.sort();
    let missing: Vec<&String> = wanted.iter().filter(|w| !entries.contains(w)).collect();
    let unlaunched: Vec<&String> = entries.iter().filter(|e| !wanted.contains(e)).collect();
    if !missing.is_empty() || !unlaunched.is_empty() {
        panic!("src/cuda.rs's OPS and cuda/brigade.cu disagree: launched but not compiled {missing:?}; compiled but not launched {unlaunched:?}");
    }
}
