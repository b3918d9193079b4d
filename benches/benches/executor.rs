//! The executor's own overhead: training steps of a pipeline of identity stages (no math),
//! so what remains is per micro-batch per stage bookkeeping (messages, stashes, timing, the
//! autograd walk of an empty graph) plus the per-step collective. Throughput is reported in
//! (micro-batch × stage) pairs, so criterion prints the cost of one F + B on one stage.
//! Also: one channel hop between two threads carrying a tensor, as stages send activations.
//!
//! Run: `cargo bench -p brigade-benches --bench executor -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use brigade_benches::IdentityModel;
use brigade_engine::pipeline::{Pipeline, PipelineConfig};
use brigade_engine::schedule::ScheduleKind;
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_channel::unbounded;

fn identity_pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("identity pipeline step");
    for stages in [1, 2, 4] {
        for m in [1, 8, 32] {
            let model = IdentityModel { layers: 4, width: 16 };
            let config = PipelineConfig::default()
                .stages(stages)
                .schedule(ScheduleKind::OneFOneB)
                .microbatches(m)
                .threads_per_stage(1);
            let mut pipeline = Pipeline::new(&model, config).unwrap();
            let (x, y) = model.batch(m * 2).unwrap();
            g.throughput(Throughput::Elements((stages * m) as u64));
            g.bench_with_input(BenchmarkId::new(format!("p={stages}"), format!("m={m}")), &m, |b, _| {
                b.iter(|| black_box(pipeline.train_step(&x, &y).unwrap()))
            });
        }
    }
    g.finish();
}

fn channel_hop(c: &mut Criterion) {
    let mut g = c.benchmark_group("stage hop round trip");
    for bytes in [4 << 10, 256 << 10] {
        let (to_peer, peer_inbox) = unbounded::<Tensor>();
        let (to_main, main_inbox) = unbounded::<Tensor>();
        let peer = std::thread::spawn(move || {
            while let Ok(t) = peer_inbox.recv() {
                if to_main.send(t).is_err() {
                    break;
                }
            }
        });
        let mut t = Tensor::zeros(bytes / 4, DType::F32, &Device::Cpu).unwrap();
        g.bench_function(format!("{} KiB tensor", bytes >> 10), |b| {
            b.iter(|| {
                to_peer.send(t.clone()).unwrap();
                t = main_inbox.recv().unwrap();
            })
        });
        // With a copy on arrival, what a move between devices would add.
        g.bench_function(format!("{} KiB tensor + copy", bytes >> 10), |b| {
            b.iter(|| {
                to_peer.send(t.clone()).unwrap();
                t = main_inbox.recv().unwrap().copy().unwrap();
            })
        });
        drop(to_peer);
        peer.join().unwrap();
    }
    g.finish();
}

criterion_group!(benches, identity_pipeline, channel_hop);
criterion_main!(benches);
