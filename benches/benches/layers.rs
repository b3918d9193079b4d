//! The hot layers of the two model families on the micro-batch sizes the bench table uses,
//! timed on the explicit path training runs: the forward, the input gradient (I) and the
//! weight gradient (W), each alone; and the executor's per-forward stash accounting (a walk of
//! the autograd graph), so its cost is visible next to the layers it accounts for.
//!
//! Everything runs as a one-thread stage does: inside a one-thread rayon pool, whose size
//! brigade's GEMM and kernels read. (Run from the bare main thread instead, every
//! rayon-parallel kernel hands its work to the global pool and waits for it: twice as slow for
//! a GPT block.) candle's elementwise pool is sized by the environment, as in `brigade`:
//!
//! Run: `CANDLE_NUM_THREADS=1 cargo bench -p brigade-benches --bench layers -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

use brigade_engine::layer::{Gradients, Pass};
use brigade_engine::memory::retained_bytes;
use brigade_engine::{LayerSpec, Mode, ParamStore};
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

/// The forward, input gradient and weight gradient of layer `index` of `layers` on input `x`
/// (the output gradient: ones).
fn layer(c: &mut Criterion, name: &str, layers: &[Arc<dyn LayerSpec>], index: usize, x: &Tensor) {
    let mut store = ParamStore::new(Device::Cpu, 0);
    // The autograd build (variables) for the stash accounting; the explicit path runs on
    // layers built over detached parameters, as a stage's are (no graph, brigade's GEMM).
    let mut tracked: Vec<_> = layers.iter().map(|l| l.build(&mut store).unwrap()).collect();
    let mut view = store.shared_view();
    let mut built: Vec<_> = layers.iter().map(|l| l.build(&mut view).unwrap()).collect();
    // The layer's real input: everything before it, run once.
    let mut h = x.clone();
    for l in built.iter_mut().take(index) {
        h = l.forward(&h, Mode::Train).unwrap().detach();
    }
    let input = h;
    let l = &mut built[index];
    let (y, _) = l.forward_train(&input, Pass::First).unwrap();
    let dy = y.ones_like().unwrap();
    // Gradients accumulate across iterations, as over a step's micro-batches after the first.
    let mut grads = Gradients::new();
    // criterion's setup and routine closures both need the layer.
    let l = std::cell::RefCell::new(l);
    let mut g = c.benchmark_group(name);
    g.bench_function("forward", |b| b.iter(|| black_box(l.borrow_mut().forward_train(&input, Pass::First).unwrap())));
    g.bench_function("input gradient (I)", |b| {
        b.iter_batched(
            || l.borrow_mut().forward_train(&input, Pass::First).unwrap().1,
            |saved| black_box(l.borrow_mut().backward_input(saved, &dy, index > 0).unwrap()),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("weight gradient (W)", |b| {
        b.iter_batched(
            || {
                let mut l = l.borrow_mut();
                let saved = l.forward_train(&input, Pass::First).unwrap().1;
                l.backward_input(saved, &dy, index > 0).unwrap().1
            },
            |saved| l.borrow_mut().backward_weight(saved, &mut grads).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let y = tracked[index].forward(&input, Mode::Train).unwrap();
    g.bench_function("stash accounting (graph walk)", |b| b.iter(|| black_box(retained_bytes(&y))));
    g.finish();
}

/// Runs `bench` with this thread as the only worker of a rayon pool, as a one-thread stage.
/// (criterion cannot move to a pool thread, so the pool joins it.)
fn as_stage(c: &mut Criterion, bench: impl FnOnce(&mut Criterion)) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).use_current_thread().build().unwrap();
    bench(c);
    drop(pool);
}

/// One pool for the whole run: a thread can join only one.
fn hot_layers(c: &mut Criterion) {
    as_stage(c, |c| {
        gpt_tiny_layers(c);
        resnet_tiny_layers(c);
    });
}

fn gpt_tiny_layers(c: &mut Criterion) {
    let model = brigade_models::preset("gpt-tiny").unwrap();
    let layers = model.layers();
    // Micro-batch of 4 sequences x 64 tokens (batch 16, m = 4).
    let ids: Vec<u32> = (0..4 * 64).map(|i| (i * 31 % 256) as u32).collect();
    let x = Tensor::from_vec(ids, (4, 64), &Device::Cpu).unwrap();
    layer(c, "gpt-tiny embedding 4x64", &layers, 0, &x);
    layer(c, "gpt-tiny block 4x64x64", &layers, 1, &x);
    layer(c, "gpt-tiny head 4x64 -> 256", &layers, layers.len() - 1, &x);
}

fn resnet_tiny_layers(c: &mut Criterion) {
    let model = brigade_models::preset("resnet-tiny").unwrap();
    let layers = model.layers();
    // Micro-batch of 4 images 3x32x32.
    let x = Tensor::ones((4, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    layer(c, "resnet-tiny stem 4x3x32x32", &layers, 0, &x);
    layer(c, "resnet-tiny layer1.0 (basic block, 8 ch)", &layers, 1, &x);
    layer(c, "resnet-tiny layer4.0 (basic block, 64 ch)", &layers, 4, &x);
}

criterion_group!(benches, hot_layers);
criterion_main!(benches);
