//! `brigade inspect`: a checkpoint's metadata, files (verified against their checksums),
//! tensors, and parameters per stage for a layout.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use brigade::engine::checkpoint::dtype_name;
use brigade::engine::partition::PartitionStrategy;
use clap::Args;

#[derive(Args)]
pub struct InspectArgs {
    /// Checkpoint directory (or a --save-dir).
    dir: PathBuf,
    /// Show parameters per stage for this many stages (default: the checkpoint's layout).
    #[arg(long)]
    stages: Option<usize>,
    /// Layers per stage, e.g. 2,2 (overrides --partition).
    #[arg(long)]
    split: Option<String>,
    #[arg(long, default_value = "uniform")]
    partition: String,
    /// Also list every tensor.
    #[arg(long)]
    tensors: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let (ckpt, _config, model) = brigade::checkpoint::open(&args.dir)?;
    if let Some(note) = &ckpt.note {
        eprintln!("note: {note}");
    }
    let m = &ckpt.meta;
    println!("checkpoint {}", ckpt.dir.display());
    // Every file read in full and checked against the checksums recorded at save.
    let started = std::time::Instant::now();
    match ckpt.verify_all()? {
        Some((files, bytes)) => println!(
            "checksums  ok: {files} files, {:.1} MB verified in {:.2}s",
            bytes as f64 / 1e6,
            started.elapsed().as_secs_f64()
        ),
        None => println!("checksums  none (saved by a brigade from before checksums; not verified)"),
    }
    println!("model      {} ({} parameters, {} weight tensors)", m.model.name, m.num_params, m.num_tensors);
    println!("config     {}", m.model.config);
    println!("step       {} of {}", m.step, m.training.total_steps);
    println!(
        "saved from {} stages (layers {}), schedule {}, {} micro-batches; brigade {}",
        m.partition.len(),
        m.partition.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
        m.schedule,
        m.microbatches,
        m.brigade_version
    );
    println!("optimizer  {}", describe_optimizer(&m.optimizer));
    let lr = &m.lr_schedule;
    println!(
        "lr         {:e} peak, linear warm-up over {} steps, cosine to {:e} at step {}",
        lr.base_lr, lr.warmup_steps, lr.min_lr, lr.total_steps
    );
    println!("grad clip  {}", m.grad_clip.map_or("off".to_string(), |c| format!("global norm {c}")));
    println!(
        "data       {} (batch {}, context {}, seed {}, next batch {})",
        m.training.data, m.training.batch_size, m.training.context, m.training.data_seed, m.training.data_position
    );
    let weights = ckpt.weight_listing();
    let mut by_file: BTreeMap<PathBuf, (usize, u64)> = BTreeMap::new();
    for (file, shape, dtype) in weights.values() {
        let e = by_file.entry(file.clone()).or_default();
        e.0 += 1;
        e.1 += (shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64;
    }
    if let Some(opt) = &ckpt.optimizer {
        for (_, (file, shape, dtype)) in opt.listing() {
            let e = by_file.entry(file).or_default();
            e.0 += 1;
            e.1 += (shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64;
        }
    }
    println!("files:");
    for (file, (n, bytes)) in &by_file {
        println!(
            "  {:<48} {:>5} tensors {:>12.3} MB",
            file.file_name().unwrap_or_default().to_string_lossy(),
            n,
            *bytes as f64 / 1e6
        );
    }
    // Parameters per stage for the requested layout.
    let layers = model.layers();
    let stages = args.stages.unwrap_or(m.partition.len()).max(1);
    let strategy = match &args.split {
        Some(s) => s.parse::<PartitionStrategy>()?,
        None if args.stages.is_none() => PartitionStrategy::Manual(m.partition.clone()),
        None => args.partition.parse::<PartitionStrategy>()?,
    };
    let counts: Vec<usize> = layers.iter().map(|l| l.param_count()).collect();
    let partition = strategy.resolve(&counts, stages)?;
    println!("parameters per stage for layout {partition} (tied weights counted on every stage holding them):");
    for (s, range) in partition.ranges().into_iter().enumerate() {
        let names: Vec<String> = layers[range.clone()].iter().map(|l| l.name()).collect();
        let params: usize = layers[range].iter().map(|l| l.param_count()).sum();
        let shown =
            if names.len() > 4 { format!("{} .. {}", names[0], names[names.len() - 1]) } else { names.join(", ") };
        println!("  stage {s}: {params:>14} parameters  [{shown}]");
    }
    if args.tensors {
        println!("tensors:");
        for (name, (file, shape, dtype)) in &weights {
            println!(
                "  {name:<52} {:<18} {:<5} {}",
                format!("{shape:?}"),
                dtype_name(*dtype),
                file.file_name().unwrap_or_default().to_string_lossy()
            );
        }
    }
    Ok(())
}

fn describe_optimizer(o: &brigade::engine::optim::OptimizerConfig) -> String {
    use brigade::engine::optim::OptimizerConfig;
    match o {
        OptimizerConfig::AdamW { beta1, beta2, eps, weight_decay } => {
            format!("AdamW (betas {beta1}, {beta2}; eps {eps:e}; weight decay {weight_decay})")
        }
        OptimizerConfig::Sgd { momentum, weight_decay, nesterov } => format!(
            "SGD (momentum {momentum}{}; weight decay {weight_decay})",
            if *nesterov { ", Nesterov" } else { "" }
        ),
    }
}
