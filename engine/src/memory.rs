//! How many bytes a forward pass keeps alive for its backward.
//!
//! candle has no allocator statistics, but its autograd graph is inspectable: every tensor on a
//! path from a trainable input to the output is kept until the backward runs (that is what
//! "stashing activations" means). Summing their storages, each allocation once (views such as
//! reshapes and transposes share one), measures the stash exactly as far as the graph shows it.
//! Two things stay invisible: tensors a fused custom op saves inside itself, and non-float
//! constants (token ids). Parameters are not counted: they live for the whole run anyway.

use std::collections::HashSet;

use candle_core::{CpuStorage, Storage, Tensor};

/// Bytes of every distinct non-parameter storage the autograd graph behind `output` holds.
pub fn retained_bytes(output: &Tensor) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    for node in output.sorted_nodes() {
        if node.is_variable() {
            continue;
        }
        let (storage, layout) = node.storage_and_layout();
        // The storage's address identifies the allocation; views of it share the same lock.
        let key = &*storage as *const Storage as usize;
        if !seen.insert(key) {
            continue;
        }
        total += match &*storage {
            Storage::Cpu(cpu) => cpu_bytes(cpu),
            // Other backends: the tensor's own extent is a close lower bound.
            _ => (layout.shape().elem_count() * node.dtype().size_in_bytes()) as u64,
        };
    }
    total
}

/// Handles to what the autograd graph behind `output` keeps alive until its backward: the
/// output and every intermediate reached from a variable, for callers that count bytes with
/// other tensors (each storage once). Variables and views of their storage (a transposed
/// weight) are left out: parameters and an autograd layer's input copy, which the caller
/// counts itself. Not included: constants that depend on no variable (a mask built in the
/// forward), which ops of the graph may also hold.
pub fn graph_tensors(output: &Tensor) -> Vec<Tensor> {
    let nodes = output.sorted_nodes();
    let variables: HashSet<usize> = nodes.iter().filter(|t| t.is_variable()).map(|t| storage_key(t)).collect();
    let mut kept: Vec<Tensor> = nodes.into_iter().filter(|t| !variables.contains(&storage_key(t))).cloned().collect();
    // The output itself may have no graph (a layer returning a constant); it is kept anyway.
    if !kept.iter().any(|t| t.id() == output.id()) {
        kept.push(output.clone());
    }
    kept
}

/// The address of `t`'s storage, which identifies the allocation (views share it).
fn storage_key(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const Storage as usize
}

/// Bytes held by `t`'s own storage (the whole allocation, even if `t` is a view of part of it).
pub fn tensor_bytes(t: &Tensor) -> u64 {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => cpu_bytes(cpu),
        _ => (layout.shape().elem_count() * t.dtype().size_in_bytes()) as u64,
    }
}

fn cpu_bytes(cpu: &CpuStorage) -> u64 {
    let bytes = match cpu {
        CpuStorage::U8(v) => v.len(),
        CpuStorage::U32(v) => v.len() * 4,
        CpuStorage::I16(v) => v.len() * 2,
        CpuStorage::I32(v) => v.len() * 4,
        CpuStorage::I64(v) => v.len() * 8,
        CpuStorage::BF16(v) => v.len() * 2,
        CpuStorage::F16(v) => v.len() * 2,
        CpuStorage::F32(v) => v.len() * 4,
        CpuStorage::F64(v) => v.len() * 8,
        CpuStorage::F8E4M3(v) => v.len(),
        CpuStorage::F6E2M3(v) | CpuStorage::F6E3M2(v) | CpuStorage::F4(v) => v.len(),
        #[allow(unreachable_patterns)]
        _ => 0,
    };
    bytes as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn counts_each_intermediate_once_and_skips_parameters() -> candle_core::Result<()> {
        let w = Var::from_tensor(&Tensor::ones((8, 8), candle_core::DType::F32, &Device::Cpu)?)?;
        let x = Tensor::ones((4, 8), candle_core::DType::F32, &Device::Cpu)?;
        // h = x @ w (4x8 f32 = 128 bytes), r = relu(h) (128 bytes), t = r^T (a view of r).
        let h = x.matmul(w.as_tensor())?;
        let r = h.relu()?;
        let t = r.t()?;
        assert_eq!(retained_bytes(&t), 256);
        // Nothing trainable behind a plain tensor: autograd keeps nothing.
        assert_eq!(retained_bytes(&x.relu()?), 0);
        assert_eq!(tensor_bytes(&t), 128);
        // The graph's handles: h, r and the view t, not the weight nor its transposed view.
        let wt = w.as_tensor().t()?;
        let out = x.matmul(&wt)?.relu()?;
        let kept = graph_tensors(&out);
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept.iter().all(|k| storage_key(k) != storage_key(&wt)));
        assert_eq!(graph_tensors(&t).len(), 3);
        Ok(())
    }
}
