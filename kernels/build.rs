//! With the `cuda` feature: compiles `cuda/brigade.cu` with nvcc into PTX (embedded by
//! `src/cuda.rs`) for `CUDA_COMPUTE_CAP` (default 90, the H100/H200), and into a cubin whose
//! `ptxas -v` report must show no register spills. Without the feature it does nothing.
//! nvcc comes from `$CUDA_PATH/bin` or `PATH` (`../shared/cuda/toolchain.sh` sets both).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=cuda/brigade.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_PATH");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = env::var("CUDA_PATH").map(|p| PathBuf::from(p).join("bin/nvcc")).ok().filter(|p| p.exists()).unwrap_or_else(|| "nvcc".into());
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
    let cubin = out.join("brigade.cubin");
    let report = run(&["--cubin", &format!("-arch=sm_{cap}"), "-Xptxas", "-v", "-o", cubin.to_str().expect("utf-8 OUT_DIR")]);
    let spills: Vec<&str> = report.lines().filter(|l| l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")).collect();
    if !spills.is_empty() {
        panic!("ptxas reports register spills in brigade's kernels:\n{}", spills.join("\n"));
    }
}
