//! Generation with the KV cache gives exactly the tokens of the full-window path (greedy), on
//! one stage and split over stages, and keeps going past the context window.
//!
//! The weights are gpt-tiny trained for a few dozen steps on the embedded corpus: random
//! weights give nearly flat logits, where two candidates can tie to within float noise and
//! the comparison would test rounding rather than the cache.

use std::collections::{BTreeMap, HashMap};

use brigade::engine::optim::{LrSchedule, OptimizerConfig};
use brigade::engine::pipeline::{Pipeline, PipelineConfig};
use brigade::engine::schedule::{Action, ActionKind, Schedule, ScheduleKind};
use brigade::generate::{generate, Decoding, Generation, Sampling};
use brigade::models::data::{Split, TokenDataset};
use brigade::models::{Gpt, GptConfig};
use candle_core::{Device, Tensor};

fn trained_tiny() -> (Gpt, HashMap<String, Tensor>) {
    let model = Gpt::new(GptConfig::preset("gpt-tiny").unwrap()).unwrap();
    let config =
        PipelineConfig::default().stages(1).optimizer(OptimizerConfig::adamw()).lr(LrSchedule::constant(3e-3)).seed(5);
    let mut pipeline = Pipeline::new(&model, config).unwrap();
    let data = TokenDataset::embedded(0);
    for step in 0..40 {
        let (x, y) = data.batch(Split::Train, step, 8, 64, 0, &Device::Cpu).unwrap();
        pipeline.train_step(&x, &y).unwrap();
    }
    let params: BTreeMap<String, Tensor> = pipeline.parameters().unwrap();
    (model, params.into_iter().collect())
}

fn pipeline(model: &Gpt, params: &HashMap<String, Tensor>, stages: usize) -> Pipeline {
    let mut config = PipelineConfig::default().stages(stages);
    config.initial_params = params.clone();
    Pipeline::new(model, config).unwrap()
}

fn run(p: &mut Pipeline, prompt: &[u32], tokens: usize, decoding: Decoding, sampling: Sampling) -> Vec<u32> {
    run_until(p, prompt, tokens, decoding, sampling, None)
}

fn run_until(
    p: &mut Pipeline,
    prompt: &[u32],
    tokens: usize,
    decoding: Decoding,
    sampling: Sampling,
    eos: Option<u32>,
) -> Vec<u32> {
    let mut streamed = Vec::new();
    let out = generate(p, 64, prompt, Generation { tokens, sampling, decoding, seed: 3, eos }, |t| {
        streamed.push(t);
        Ok(())
    })
    .unwrap();
    assert_eq!(streamed, out, "every token is streamed as it is produced");
    out
}

/// GPipe over two chunks with the devices swapped: device 1 runs chunk 0, device 0 chunk 1.
fn reversed_two_chunks() -> Schedule {
    let list = |device: usize, chunk: usize| -> Vec<Action> {
        let kinds = [ActionKind::Forward, ActionKind::Forward, ActionKind::Backward, ActionKind::Backward];
        kinds.iter().zip([0, 1, 0, 1]).map(|(&kind, mb)| Action::on_chunk(device, chunk, kind, mb)).collect()
    };
    Schedule::from_actions("reversed", 2, 2, vec![list(0, 1), list(1, 0)]).unwrap()
}

#[test]
fn greedy_kv_cache_equals_full_window_on_one_and_more_stages() {
    let (model, params) = trained_tiny();
    let prompt: Vec<u32> = b"The cat ".iter().map(|&b| b as u32).collect();
    // 8 + 56 = 64 tokens: the whole context, no sliding.
    let mut one = pipeline(&model, &params, 1);
    let reference = run(&mut one, &prompt, 56, Decoding::FullWindow, Sampling::greedy());
    let distinct: std::collections::HashSet<_> = reference.iter().collect();
    assert!(distinct.len() > 3, "a trained model generates varied text: {reference:?}");
    assert_eq!(run(&mut one, &prompt, 56, Decoding::Cached, Sampling::greedy()), reference);
    // An eos token ends the generation right after its first occurrence, on both paths; one
    // that never comes changes nothing.
    // The first token unlike the first generated one: its first occurrence is at `stop`.
    let stop = reference.iter().position(|&t| t != reference[0]).expect("varied text");
    let eos = reference[stop];
    for decoding in [Decoding::Cached, Decoding::FullWindow] {
        let until = run_until(&mut one, &prompt, 56, decoding, Sampling::greedy(), Some(eos));
        assert_eq!(until, reference[..=stop], "{decoding:?}");
        let absent = (0..256).find(|t| !reference.contains(t)).unwrap();
        assert_eq!(run_until(&mut one, &prompt, 56, decoding, Sampling::greedy(), Some(absent)), reference);
    }
    for stages in [2, 4] {
        let mut split = pipeline(&model, &params, stages);
        assert_eq!(split.partition().stages(), stages);
        assert_eq!(run(&mut split, &prompt, 56, Decoding::Cached, Sampling::greedy()), reference, "{stages} stages");
    }
    // Virtual stages: ZB-V puts chunks 0 and 3 on device 0, 1 and 2 on device 1, so the
    // decoding activation goes 0 → 1 → 1 → 0; interleaved 1F1B goes 0 → 1 → 0 → 1.
    for kind in [ScheduleKind::ZbV, ScheduleKind::Interleaved] {
        let mut config = PipelineConfig::default().stages(2).schedule(kind).microbatches(2);
        config.initial_params = params.clone();
        let mut chunked = Pipeline::new(&model, config).unwrap();
        assert_eq!(run(&mut chunked, &prompt, 56, Decoding::Cached, Sampling::greedy()), reference, "{kind}");
    }
    // A hand-written placement whose first chunk is not on device 0: the token ids must go to
    // the device holding chunk 0 (device 1 here), and the activation comes back to device 0.
    let mut config = PipelineConfig::default().stages(2).schedule(reversed_two_chunks()).microbatches(2);
    config.initial_params = params.clone();
    let mut reversed = Pipeline::new(&model, config).unwrap();
    assert_eq!(reversed.schedule().placement(), [1, 0]);
    assert_eq!(run(&mut reversed, &prompt, 56, Decoding::Cached, Sampling::greedy()), reference, "chunk 0 on device 1");
    // A second generation on the same pipeline starts a fresh cache.
    let other: Vec<u32> = b"A dog".iter().map(|&b| b as u32).collect();
    let mut two = pipeline(&model, &params, 2);
    let want = run(&mut one, &other, 20, Decoding::FullWindow, Sampling::greedy());
    run(&mut two, &prompt, 10, Decoding::Cached, Sampling::greedy());
    assert_eq!(run(&mut two, &other, 20, Decoding::Cached, Sampling::greedy()), want);
}

#[test]
fn sampling_with_the_cache_matches_full_window_and_goes_past_the_context() {
    let (model, params) = trained_tiny();
    let prompt: Vec<u32> = b"Once".iter().map(|&b| b as u32).collect();
    let sampling = Sampling { temperature: 0.8, top_k: Some(20), top_p: Some(0.95) };
    let mut one = pipeline(&model, &params, 1);
    let mut two = pipeline(&model, &params, 2);
    // Same seed, same logits (to float noise): the same draws, within the context.
    let full = run(&mut one, &prompt, 60, Decoding::FullWindow, sampling);
    assert_eq!(run(&mut two, &prompt, 60, Decoding::Cached, sampling), full);
    // Past n_ctx = 64 the cache restarts from the newest half window and keeps going.
    let long = run(&mut two, &prompt, 200, Decoding::Cached, Sampling::greedy());
    assert_eq!(long.len(), 200);
    let full_long = run(&mut one, &prompt, 200, Decoding::FullWindow, Sampling::greedy());
    assert_eq!(long[..60], full_long[..60], "identical while the sequence fits the context");
}
