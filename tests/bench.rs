//! The bench's measurements and the profiler agree with what the executor actually does:
//! per-action timings follow the schedule, the measured activation stash follows the
//! schedule's depth (GPipe m, 1F1B p − s), and the profile predicts that stash exactly.

use brigade::bench::{batch, chrome_trace, markdown_table, profile_on_data, run, timeline_svg, RunConfig};
use brigade::engine::optim::OptimizerConfig;
use brigade::engine::partition::{Partition, PartitionStrategy};
use brigade::engine::profile::ProfileOptions;
use brigade::engine::simulate::{predict, StageCosts};
use brigade::models::data::TokenDataset;
use brigade::prelude::*;

fn quick_profile_options() -> ProfileOptions {
    ProfileOptions { repeats: 1, rounds: 1, warmup: 0, threads: 1, ..ProfileOptions::default() }
}

#[test]
fn step_stats_time_every_action_in_schedule_order_and_stash_follows_schedule_depth() {
    let model = brigade::models::preset("gpt-tiny").unwrap();
    let data = Dataset::Tokens(TokenDataset::embedded(0));
    let (x, y) = batch(&data, model.as_ref(), 0, 8, Some(32), 0).unwrap();
    let mut peaks = Vec::new();
    for kind in ScheduleKind::ALL {
        let config = PipelineConfig::default().stages(2).schedule(kind).microbatches(4).threads_per_stage(1);
        let mut pipeline = Pipeline::new(model.as_ref(), config).unwrap();
        let stats = pipeline.train_step(&x, &y).unwrap();
        let schedule = pipeline.schedule().clone();
        for s in 0..2 {
            let timed = &stats.stage_actions[s];
            let order: Vec<Action> = timed.iter().map(|t| t.action).collect();
            assert_eq!(order, schedule.stage_actions(s), "{kind} stage {s}");
            for w in timed.windows(2) {
                assert!(w[0].end <= w[1].start, "actions overlap on stage {s}: {w:?}");
            }
            assert!(timed.iter().all(|t| t.start <= t.end && t.end <= stats.elapsed));
            // Computing time never exceeds what the stage's busy clock saw.
            let computing: std::time::Duration = timed.iter().map(|t| t.end - t.start).sum();
            assert!(computing <= stats.stage_busy[s], "stage {s}: {computing:?} > {:?}", stats.stage_busy[s]);
        }
        peaks.push(stats.peak_stash_bytes.clone());

        // The profile of one micro-batch predicts the executor's stash to the byte.
        let profile = profile_on_data(model.as_ref(), &data, 2, Some(32), &quick_profile_options()).unwrap();
        let costs = StageCosts::from_profile(&profile, pipeline.partition()).unwrap();
        let predicted = predict(&schedule, &costs).unwrap();
        for s in 0..2 {
            assert_eq!(predicted.peak_stash_bytes[s], stats.peak_stash_bytes[s], "{kind} stage {s}");
            assert_eq!(
                predicted.peak_memory[s] - predicted.static_bytes[s],
                stats.peak_stash_bytes[s],
                "{kind} stage {s}"
            );
        }
    }
    let (gpipe, one_f_one_b) = (&peaks[0], &peaks[1]);
    assert!(gpipe[0] > 0 && gpipe[1] > 0);
    // GPipe holds all 4 micro-batches; 1F1B holds 2 on stage 0 and 1 on stage 1.
    assert_eq!(gpipe[0], 2 * one_f_one_b[0]);
    assert_eq!(gpipe[1], 4 * one_f_one_b[1]);
}

#[test]
fn recomputation_stashes_only_stage_inputs_and_the_profile_predicts_its_peak() {
    // gpt-tiny on 2 stages: with recomputation a stage keeps only its received input per
    // micro-batch, plus, while one backward reruns its forward, that micro-batch's full
    // activations. The simulator's memory model predicts the measured peak to the byte.
    let model = brigade::models::preset("gpt-tiny").unwrap();
    let data = Dataset::Tokens(TokenDataset::embedded(0));
    let (x, y) = batch(&data, model.as_ref(), 0, 8, Some(32), 0).unwrap();
    let profile = profile_on_data(model.as_ref(), &data, 2, Some(32), &quick_profile_options()).unwrap();
    for kind in ScheduleKind::ALL {
        let mut peaks = Vec::new();
        for recompute in [Recompute::Off, Recompute::Full] {
            let config = PipelineConfig::default()
                .stages(2)
                .schedule(kind)
                .microbatches(4)
                .threads_per_stage(1)
                .recompute(recompute);
            let mut pipeline = Pipeline::new(model.as_ref(), config).unwrap();
            let stats = pipeline.train_step(&x, &y).unwrap();
            let costs = StageCosts::from_profile_with(&profile, pipeline.partition(), recompute).unwrap();
            let predicted = predict(pipeline.schedule(), &costs).unwrap();
            for s in 0..2 {
                assert_eq!(predicted.peak_stash_bytes[s], stats.peak_stash_bytes[s], "{kind} {recompute:?} stage {s}");
            }
            peaks.push(stats.peak_stash_bytes.clone());
        }
        let (off, full) = (&peaks[0], &peaks[1]);
        let schedule = kind.build(2, 4).unwrap();
        for s in 0..2 {
            // A stage holding one micro-batch at a time (1F1B's last) rebuilds just as much;
            // never more.
            if schedule.peak_in_flight(s) == 1 {
                assert_eq!(full[s], off[s], "{kind} stage {s}");
            } else {
                assert!(full[s] <= off[s], "{kind} stage {s}: recomputation kept {} bytes vs {}", full[s], off[s]);
            }
        }
        eprintln!("{kind}: peak stash per stage without recomputation {off:?}, with {full:?}");
    }
}

#[test]
fn profile_reports_sizes_from_shapes_and_positive_times() {
    let model = brigade::models::preset("gpt-tiny").unwrap();
    let data = Dataset::Tokens(TokenDataset::embedded(0));
    let profile = profile_on_data(model.as_ref(), &data, 2, Some(16), &quick_profile_options()).unwrap();
    let layers = model.layers();
    assert_eq!(profile.layers.len(), layers.len());
    assert_eq!(profile.input_shape, vec![2, 16]);
    for (l, spec) in profile.layers.iter().zip(&layers) {
        assert_eq!(l.name, spec.name());
        assert_eq!(l.param_bytes(), 4 * spec.param_count() as u64);
        assert_eq!(l.optimizer_state_ratio, 2);
        assert!(l.forward_s > 0.0 && l.backward_input_s > 0.0 && l.optimizer_s > 0.0, "{l:?}");
        // Every gpt-tiny layer has weights: the weight gradient is timed work of its own, not
        // a share of the backward (`backward_s` is I + W by construction).
        assert!(spec.param_count() > 0 && l.backward_weight_s > 0.0, "{l:?}");
        // The fused backward is timed too, so that the split's cost can be read off.
        assert!(l.backward_fused_s > 0.0 && l.split_overhead().is_some_and(f64::is_finite), "{l:?}");
    }
    // gpt-tiny: width 64, so a block sends (2, 16, 64) f32 downstream and keeps more than that.
    let block = &profile.layers[1];
    assert_eq!(block.output_bytes, 2 * 16 * 64 * 4);
    assert!(block.activation_bytes > block.output_bytes);
    // The head computes the loss itself, chunk by chunk: its output is the loss (one f64), and
    // the (2, 16, 256) logits never exist whole.
    assert_eq!(profile.layers.last().unwrap().output_bytes, 8);
    assert!(profile.hop.latency_s > 0.0 && profile.hop.latency_s < 0.1, "{:?}", profile.hop);
    assert!(profile.hop.copy_bytes_per_s > 1e6);
    // The machine's cores, and the contention probe: as many 1-thread copies as the cores hold
    // (at least 2), each pass timed alone and together.
    let cores = brigade::engine::pipeline::available_cores();
    assert_eq!(profile.cores, cores);
    let contention = profile.contention.expect("a CPU profile measures contention");
    assert_eq!((contention.copies, contention.cores, contention.threads), (cores.max(2), cores, 1));
    assert!(contention.alone_s > 0.0 && contention.concurrent_s > 0.0, "{contention:?}");
    assert!(contention.factor() >= 1.0 && contention.factor().is_finite());
    // Round-trips through JSON (floats to within serde_json's last-digit rounding).
    let json = serde_json::to_string(&profile).unwrap();
    let back: brigade::engine::profile::Profile = serde_json::from_str(&json).unwrap();
    assert_eq!(back.layers.len(), profile.layers.len());
    for (a, b) in back.layers.iter().zip(&profile.layers) {
        assert_eq!(
            (&a.name, a.activation_bytes, a.output_bytes, &a.params),
            (&b.name, b.activation_bytes, b.output_bytes, &b.params)
        );
        assert!((a.forward_s - b.forward_s).abs() <= 1e-15 && (a.backward_s - b.backward_s).abs() <= 1e-15);
    }
}

#[test]
fn the_stage_order_split_times_both_backwards() {
    let model = brigade::models::preset("gpt-tiny").unwrap();
    let data = Dataset::Tokens(TokenDataset::embedded(0));
    let (x, y) = batch(&data, model.as_ref(), 0, 2, Some(16), 0).unwrap();
    let split = brigade::engine::profile::stage_order_split(model.as_ref(), &x, &y, &quick_profile_options()).unwrap();
    assert!(split.fused_s > 0.0 && split.split_s > 0.0 && split.overhead().is_finite(), "{split:?}");
}

#[test]
fn a_bench_run_reports_consistent_numbers_and_timelines() {
    let model = brigade::models::preset("gpt-tiny").unwrap();
    let data = Dataset::Tokens(TokenDataset::embedded(0));
    let profile = profile_on_data(model.as_ref(), &data, 2, Some(32), &quick_profile_options()).unwrap();
    let config = RunConfig {
        stages: 2,
        partition: PartitionStrategy::Uniform,
        schedule: ScheduleKind::OneFOneB,
        virtual_stages: 1,
        microbatches: 4,
        batch_size: 8,
        warmup: 1,
        steps: 3,
        threads_per_stage: 1,
        thread_pools: brigade::prelude::ThreadPools::Shared,
        devices: Vec::new(),
        compute_dtype: candle_core::DType::F32,
        context: Some(32),
        seed: 0,
        optimizer: OptimizerConfig::adamw(),
    };
    let mut steps_seen = 0;
    let result = run(model.clone(), &data, &config, &profile, || steps_seen += 1).unwrap();
    assert_eq!(steps_seen, 4);
    let row = &result.row;
    assert!(row.step_s.min <= row.step_s.median && row.step_s.median <= row.step_s.max);
    assert!((0.0..1.0).contains(&row.measured_bubble), "{}", row.measured_bubble);
    assert!((row.theoretical_bubble - 1.0 / 5.0).abs() < 1e-12);
    assert!((row.throughput - 8.0 * 32.0 / row.step_s.median).abs() < 1e-6);
    assert!((row.simulation_error - (row.simulated_step_s / row.step_s.median - 1.0)).abs() < 1e-9);
    assert_eq!(row.partition, format!("{} (uniform)", Partition::uniform(4, 2).unwrap()));
    assert_eq!(row.peak_memory_bytes.len(), 2);

    let table = markdown_table(std::slice::from_ref(row));
    assert_eq!(table.lines().count(), 3);
    assert!(table.lines().nth(2).unwrap().starts_with("| gpt-tiny | 2 2,2 (uniform) | 1f1b | 1 | 4 |"), "{table}");

    let actions: usize = result.median_step.stage_actions.iter().map(Vec::len).sum();
    assert_eq!(actions, 2 * 2 * 4);
    let trace = chrome_trace(&result.median_step, Some(&result.prediction.timeline));
    let events = trace["traceEvents"].as_array().unwrap();
    let complete = |pid: u64| events.iter().filter(|e| e["ph"] == "X" && e["pid"] == pid).count();
    // Every measured action plus each stage's step end; every simulated action.
    assert_eq!(complete(1), actions + 2);
    assert_eq!(complete(2), actions);
    let svg = timeline_svg("t", &result.median_step, Some(&result.prediction));
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // One coloured rectangle per action, measured and simulated.
    assert_eq!(svg.matches("<title>1F").count(), 2 * 4);
    assert_eq!(svg.matches("<title>0B").count(), 2 * 4);
}
