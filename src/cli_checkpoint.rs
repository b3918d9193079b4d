//! The checkpoint commands of the `brigade` CLI: export, inspect, predict, generate.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use brigade::checkpoint::ExportDtype;
use brigade::engine::checkpoint::dtype_name;
use brigade::engine::partition::PartitionStrategy;
use brigade::engine::pipeline::{Pipeline, PipelineConfig};
use brigade::engine::{InputKind, PipelineModel};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Parses `2GB`, `500MB`, `64KiB`, `1000` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("invalid size {text:?}: expected e.g. 2GB, 500MB or a byte count"))?;
    let scale: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" | "K" => 1e3,
        "MB" | "M" => 1e6,
        "GB" | "G" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("invalid size unit {other:?} in {text:?}: use B, KB, MB, GB, KiB, MiB or GiB")),
    };
    let bytes = (value * scale).round();
    if bytes < 1.0 {
        return Err(format!("size {text:?} must be at least one byte"));
    }
    Ok(bytes as u64)
}

#[derive(Args)]
pub struct ExportArgs {
    /// Checkpoint directory (or a --save-dir; its latest checkpoint is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// f32, bf16 or f16 (integer buffers stay integers).
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "2GB", value_parser = parse_size)]
    max_shard_size: u64,
}

pub fn export(args: ExportArgs) -> Result<()> {
    let dtype: ExportDtype = args.dtype.parse()?;
    let started = std::time::Instant::now();
    let summary = brigade::checkpoint::export(&args.checkpoint, &args.out, dtype, args.max_shard_size)?;
    println!(
        "exported {} tensors ({:.1} MB, {}) to {} in {:.2}s as {}",
        summary.tensors,
        summary.bytes as f64 / 1e6,
        args.dtype,
        summary.dir.display(),
        started.elapsed().as_secs_f64(),
        summary.format
    );
    for f in &summary.files {
        println!("  {}", f.display());
    }
    match summary.format {
        "gpt2" => println!("load with: transformers.GPT2LMHeadModel.from_pretrained({:?})", summary.dir.display().to_string()),
        _ => println!("load with: model.load_state_dict(safetensors.torch.load_file(\"{}/model.safetensors\"), strict=True)", summary.dir.display()),
    }
    Ok(())
}

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

pub fn inspect(args: InspectArgs) -> Result<()> {
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
        println!("  {:<48} {:>5} tensors {:>12.3} MB", file.file_name().unwrap_or_default().to_string_lossy(), n, *bytes as f64 / 1e6);
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
        let shown = if names.len() > 4 { format!("{} .. {}", names[0], names[names.len() - 1]) } else { names.join(", ") };
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

/// A pipeline holding a checkpoint's weights, for inference. `checkpoint` may also be a
/// Hugging Face GPT-2 directory, or (with `model`) a torchvision-named ResNet safetensors file.
fn inference_pipeline(
    checkpoint: &std::path::Path,
    model: Option<&str>,
    stages: Option<usize>,
    split: Option<&str>,
    microbatches: usize,
) -> Result<(Pipeline, std::sync::Arc<dyn PipelineModel>)> {
    if !checkpoint.exists() {
        bail!("--checkpoint {} does not exist", checkpoint.display());
    }
    let hint = model.map(brigade::models::ModelConfig::preset).transpose()?;
    let imported = brigade::checkpoint::import(checkpoint, hint.as_ref())?;
    let opened = brigade::checkpoint::open(checkpoint).ok();
    if let Some(note) = opened.as_ref().and_then(|(c, _, _)| c.note.as_ref()) {
        eprintln!("note: {note}");
    }
    let saved_stages = opened.map(|(c, _, _)| c.meta.partition.len()).unwrap_or(1);
    if stages == Some(0) {
        bail!("--stages must be at least 1");
    }
    if microbatches == 0 {
        bail!("--microbatches must be at least 1");
    }
    let model = imported.config.build()?;
    let layers = model.layers().len();
    if let Some(asked) = stages.filter(|&s| s > layers) {
        bail!("--stages {asked}: {} has only {layers} layers, so at most {layers} stages", model.name());
    }
    let stages = stages.unwrap_or(saved_stages).clamp(1, layers);
    let partition = match split {
        Some(s) => s.parse::<PartitionStrategy>()?,
        None => PartitionStrategy::Uniform,
    };
    let mut config = PipelineConfig::default().stages(stages).partition(partition).microbatches(microbatches.max(1));
    config.initial_params = imported.params;
    config.initial_buffers = imported.buffers;
    let pipeline = Pipeline::new(model.as_ref(), config)?;
    Ok((pipeline, model))
}

#[derive(Args)]
pub struct PredictArgs {
    /// A brigade checkpoint, a Hugging Face GPT-2 directory, or torchvision ResNet weights
    /// (with --model).
    #[arg(long)]
    checkpoint: PathBuf,
    /// ResNet preset whose torchvision weights --checkpoint is (resnet18, ...).
    #[arg(long)]
    model: Option<String>,
    /// safetensors file with one tensor (or one named input_ids / images): token ids
    /// (batch, time) for GPT, images (batch, channels, height, width) for ResNet.
    #[arg(long)]
    input: PathBuf,
    /// Where to write `logits`.
    #[arg(long)]
    output: PathBuf,
    /// Stages to run on (default: the checkpoint's count).
    #[arg(long)]
    stages: Option<usize>,
    #[arg(long)]
    split: Option<String>,
    #[arg(long, default_value_t = 1)]
    microbatches: usize,
}

pub fn predict(args: PredictArgs) -> Result<()> {
    // Before any work: where the output goes must be a place that can take it.
    brigade::engine::checkpoint::refuse_inside_checkpoint(&args.output, "--output")?;
    if args.output.is_dir() {
        bail!("--output {} is a directory; give a file name such as logits.safetensors", args.output.display());
    }
    if !args.input.exists() {
        bail!("input file {} does not exist", args.input.display());
    }
    if args.input.canonicalize().ok() == args.output.canonicalize().ok() {
        bail!("--output {} is the --input file; write the logits to another file", args.output.display());
    }
    let (mut pipeline, model) = inference_pipeline(&args.checkpoint, args.model.as_deref(), args.stages, args.split.as_deref(), args.microbatches)?;
    let tensors = candle_core::safetensors::load(&args.input, &Device::Cpu)
        .with_context(|| format!("cannot read {} as safetensors", args.input.display()))?;
    let input = ["input_ids", "tokens", "images", "input"]
        .iter()
        .find_map(|k| tensors.get(*k).cloned())
        .or_else(|| (tensors.len() == 1).then(|| tensors.values().next().cloned()).flatten())
        .with_context(|| {
            format!(
                "{} holds {} tensors ({}); expected one, or one named input_ids or images",
                args.input.display(),
                tensors.len(),
                tensors.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
    let input = match model.input() {
        InputKind::Tokens { .. } => {
            if input.dtype().is_float() {
                // Converting would saturate a negative or fractional id silently.
                let values: Vec<f64> = input.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
                if let Some(bad) = values.iter().find(|v| v.fract() != 0.0 || **v < 0.0) {
                    bail!("{}: token ids must be non-negative integers, found {bad}", args.input.display());
                }
            } else if matches!(input.dtype(), DType::I64) {
                // A cast would wrap a negative id around to a huge one.
                let values: Vec<i64> = input.flatten_all()?.to_vec1()?;
                if let Some(bad) = values.iter().find(|v| **v < 0) {
                    bail!("{}: token ids must be non-negative, found {bad}", args.input.display());
                }
            }
            input.to_dtype(DType::U32)?
        }
        InputKind::Images { .. } => input.to_dtype(DType::F32)?,
    };
    let started = std::time::Instant::now();
    let logits = pipeline.predict(&input)?;
    let path = &args.output;
    // Written like checkpoint files: flushed, and readable by others (0644).
    brigade::engine::checkpoint::write_safetensors(path, &[("logits".to_string(), logits.clone())], &Default::default())
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "{}: logits {:?} for input {:?} in {:.3}s on {} stages -> {}",
        model.name(),
        logits.dims(),
        input.dims(),
        started.elapsed().as_secs_f64(),
        pipeline.partition().stages(),
        path.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A brigade GPT checkpoint or a Hugging Face GPT-2 directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Prompt text (byte-level models: vocabulary 256).
    #[arg(long, default_value = "", conflicts_with = "prompt_ids")]
    prompt: String,
    /// Prompt as comma-separated token ids (for other vocabularies).
    #[arg(long, allow_hyphen_values = true)]
    prompt_ids: Option<String>,
    /// Tokens to generate (printed as they come; at most 100000).
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// 0: greedy; otherwise sample from softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    stages: Option<usize>,
}

/// Most tokens one `generate` produces: each token is a full forward pass over the context, so
/// more would run for hours; a larger request is refused rather than left to look hung.
const MAX_GENERATE_TOKENS: usize = 100_000;

pub fn generate(args: GenerateArgs) -> Result<()> {
    if args.tokens > MAX_GENERATE_TOKENS {
        bail!("--tokens {} is more than the {MAX_GENERATE_TOKENS} one run generates; ask for fewer", args.tokens);
    }
    let (mut pipeline, model) = inference_pipeline(&args.checkpoint, None, args.stages, None, 1)?;
    let InputKind::Tokens { vocab, context } = model.input() else {
        bail!("{} is not a language model; `generate` needs a GPT checkpoint", model.name());
    };
    if args.temperature < 0.0 || !args.temperature.is_finite() {
        bail!("temperature must be a non-negative number, got {}", args.temperature);
    }
    let byte_level = vocab <= 256;
    let mut ids: Vec<u32> = match &args.prompt_ids {
        Some(list) => list
            .split(',')
            .map(|t| match t.trim().parse::<i64>() {
                Ok(id) if id < 0 => bail!("token id {id} in --prompt-ids is negative; ids count from 0"),
                Ok(id) => u32::try_from(id).with_context(|| format!("token id {id} in --prompt-ids is beyond the vocabulary of {vocab}")),
                Err(_) => bail!("invalid token id {t:?} in --prompt-ids: expected comma-separated integers such as 1,2,3"),
            })
            .collect::<Result<_>>()?,
        None if byte_level => args.prompt.bytes().map(u32::from).collect(),
        None if args.prompt.is_empty() => Vec::new(),
        None => bail!("{} has a {vocab}-token vocabulary, not bytes: give the prompt as --prompt-ids", model.name()),
    };
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("prompt token id {bad} is beyond the vocabulary of {vocab}");
    }
    if ids.is_empty() {
        ids.push(if byte_level { b'\n' as u32 } else { 0 });
    }
    let prompt_len = ids.len();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let started = std::time::Instant::now();
    // Streamed: the prompt, then each token as soon as it exists, so a long generation shows
    // progress (and can be stopped) instead of printing everything at the end.
    let mut out = Utf8Stream::new(byte_level);
    out.push(&ids)?;
    for _ in 0..args.tokens {
        let window = &ids[ids.len().saturating_sub(context)..];
        let x = Tensor::new(window, &Device::Cpu)?.unsqueeze(0)?;
        let logits = pipeline.predict(&x)?; // (1, T, V)
        let last: Vec<f32> = logits.get(0)?.get(window.len() - 1)?.to_vec1()?;
        let next = if args.temperature == 0.0 {
            last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)
        } else {
            let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let weights: Vec<f64> = last.iter().map(|&l| ((l as f64 - max) / args.temperature).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut pick = rng.random::<f64>() * total;
            let mut chosen = weights.len() - 1;
            for (i, w) in weights.iter().enumerate() {
                if pick < *w {
                    chosen = i;
                    break;
                }
                pick -= w;
            }
            chosen
        };
        ids.push(next as u32);
        out.push(&[next as u32])?;
    }
    out.finish()?;
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "{} tokens in {elapsed:.2}s ({:.1} tok/s) on {} stages, prompt {prompt_len} tokens",
        args.tokens,
        args.tokens as f64 / elapsed.max(1e-9),
        pipeline.partition().stages()
    );
    Ok(())
}

/// Prints generated tokens as they come: bytes as UTF-8 text (a character split over several
/// tokens is held back until complete; an invalid sequence prints as U+FFFD), other
/// vocabularies as comma-separated ids.
struct Utf8Stream {
    byte_level: bool,
    pending: Vec<u8>,
    first: bool,
}

impl Utf8Stream {
    fn new(byte_level: bool) -> Self {
        Self { byte_level, pending: Vec::new(), first: true }
    }

    fn push(&mut self, ids: &[u32]) -> Result<()> {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        if !self.byte_level {
            for id in ids {
                let sep = if self.first { "" } else { "," };
                self.first = false;
                write!(stdout, "{sep}{id}")?;
            }
            return Ok(stdout.flush()?);
        }
        self.pending.extend(ids.iter().map(|&i| i as u8));
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    write!(stdout, "{text}")?;
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    write!(stdout, "{}", std::str::from_utf8(&self.pending[..valid]).expect("checked valid"))?;
                    match e.error_len() {
                        // Invalid bytes: replace them, as from_utf8_lossy would, and go on.
                        Some(bad) => {
                            write!(stdout, "\u{FFFD}")?;
                            self.pending.drain(..valid + bad);
                        }
                        // An incomplete character at the end: wait for its next bytes.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        Ok(stdout.flush()?)
    }

    fn finish(&mut self) -> Result<()> {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        if !self.pending.is_empty() {
            write!(stdout, "{}", String::from_utf8_lossy(&self.pending))?;
            self.pending.clear();
        }
        writeln!(stdout)?;
        Ok(stdout.flush()?)
    }
}
