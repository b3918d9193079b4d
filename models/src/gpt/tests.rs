//! GPT tests: parameter counts and names against Hugging Face, shapes, causality, every layer's
//! explicit backward against autograd and finite differences, KV-cache decoding, bad inputs.

use brigade_engine::layer::unique_params;
use brigade_engine::{Init, InputKind, Layer, Mode, ParamStore, Pass, PipelineModel};
use candle_core::{DType, Device, Result, Tensor, Var};

use super::embedding::{WPE, WTE};
use super::*;

fn tiny() -> GptConfig {
    GptConfig::preset("gpt-tiny").unwrap()
}

#[test]
fn absurd_sizes_are_refused_by_name() {
    // A size far past any model (a typo, or a hostile config.json) names the field.
    let e = GptConfig::custom(256, 64, 64, 1 << 60, 4).unwrap_err().to_string();
    assert!(e.contains("n_layer = 1152921504606846976 is larger than brigade supports"), "{e}");
    // Each size within bounds, but together over 2^40 parameters.
    let e = GptConfig::custom(256, 64, 1 << 16, 1 << 16, 4).unwrap_err().to_string();
    assert!(e.contains("parameters, more than brigade supports"), "{e}");
    // GPT-2 XL-sized configs are fine.
    GptConfig::custom(50257, 1024, 1600, 48, 25).unwrap();
}

/// Builds every layer of `model` in one store.
fn build_all(model: &dyn PipelineModel, store: &mut ParamStore) -> Vec<Box<dyn Layer>> {
    model.layers().iter().map(|l| l.build(store).unwrap()).collect()
}

fn run(layers: &mut [Box<dyn Layer>], x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for l in layers.iter_mut() {
        h = l.forward(&h, Mode::Train)?;
    }
    Ok(h)
}

fn ids(data: &[u32], b: usize, t: usize) -> Tensor {
    Tensor::from_slice(data, (b, t), &Device::Cpu).unwrap()
}

#[test]
fn param_counts_match_hugging_face() {
    let expected = [
        ("gpt2", 124_439_808usize),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ];
    for (name, n) in expected {
        assert_eq!(Gpt::from_preset(name).unwrap().num_params(), n, "{name}");
    }
    // gpt-tiny: wte 256·64 + wpe 64·64 + 2 blocks · (12·64² + 13·64) + ln_f 128.
    let tiny = Gpt::from_preset("gpt-tiny").unwrap();
    assert_eq!(tiny.num_params(), 16384 + 4096 + 2 * (12 * 4096 + 13 * 64) + 128);
    // The layer list counts the tied table in both users.
    let per_layer: usize = tiny.layers().iter().map(|l| l.param_count()).sum();
    assert_eq!(per_layer, tiny.num_params() + 256 * 64);
}

#[test]
fn layer_list_and_names() {
    let model = Gpt::from_preset("gpt-tiny").unwrap();
    let names: Vec<String> = model.layers().iter().map(|l| l.name()).collect();
    assert_eq!(names, ["transformer.embed", "transformer.h.0", "transformer.h.1", "lm_head"]);
    let params: Vec<String> = unique_params(&model.layers()).into_iter().map(|p| p.name).collect();
    for n in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.1.ln_1.weight",
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.1.attn.c_attn.bias",
        "transformer.h.1.attn.c_proj.weight",
        "transformer.h.1.ln_2.bias",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.bias",
        "transformer.ln_f.weight",
    ] {
        assert!(params.iter().any(|p| p == n), "missing {n}");
    }
    let attn =
        unique_params(&model.layers()).into_iter().find(|p| p.name == "transformer.h.0.attn.c_attn.weight").unwrap();
    assert_eq!(attn.shape, vec![64, 192]); // Conv1D layout (in, out)
    assert_eq!(model.input(), InputKind::Tokens { vocab: 256, context: 64 });
    assert_eq!(model.name(), "gpt-tiny");
}

#[test]
fn forward_shapes_and_tied_head() {
    let model = Gpt::from_preset("gpt-tiny").unwrap();
    let mut store = ParamStore::new(Device::Cpu, 0);
    let mut layers = build_all(&model, &mut store);
    let data: Vec<u32> = (0..2 * 10).map(|i| (i * 37 % 256) as u32).collect();
    let logits = run(&mut layers, &ids(&data, 2, 10)).unwrap();
    assert_eq!(logits.dims(), &[2, 10, 256]);
    // Tied: one Var for the table, and its gradient gets contributions from both layers.
    assert_eq!(store.len(), unique_params(&model.layers()).len());
    let loss = logits.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let wte = store.var(WTE).unwrap();
    let g = grads.get(wte.as_tensor()).unwrap();
    // Rows of tokens never fed in still get gradient through the head.
    let unused_row = g.get(1).unwrap().abs().unwrap().sum_all().unwrap();
    assert!(unused_row.to_scalar::<f32>().unwrap() > 0.0);
}

#[test]
fn causal_future_tokens_do_not_change_past_logits() {
    let model = Gpt::from_preset("gpt-tiny").unwrap();
    let mut store = ParamStore::new(Device::Cpu, 1);
    let mut layers = build_all(&model, &mut store);
    let a: Vec<u32> = vec![5, 17, 200, 3, 99, 42, 7, 8];
    let mut b = a.clone();
    b[5] = 250;
    b[7] = 1;
    let la = run(&mut layers, &ids(&a, 1, 8)).unwrap();
    let lb = run(&mut layers, &ids(&b, 1, 8)).unwrap();
    let diff = (&la - &lb).unwrap().abs().unwrap();
    let past = diff.narrow(1, 0, 5).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let future = diff.narrow(1, 5, 3).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(past, 0.0);
    assert!(future > 1e-4);
}

/// Every layer's hand-written backward (input and weight steps) against autograd through its
/// `forward`, and a few entries of every parameter's gradient against finite differences.
#[test]
fn explicit_backward_matches_autograd_and_finite_differences() {
    use brigade_engine::gradcheck::{check_layer, finite_differences};
    let model = Gpt::new(GptConfig::custom(16, 8, 8, 2, 2).unwrap()).unwrap();
    let layers = model.layers();
    let ids = ids(&[1, 5, 9, 2, 15, 0, 3, 3, 7, 11], 2, 5);
    // Hidden states of a trained model's order of magnitude, so LayerNorm is well
    // conditioned for finite differences.
    let hidden = (Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap() * 2.0).unwrap();
    for (i, spec) in layers.iter().enumerate() {
        let x = if i == 0 { &ids } else { &hidden };
        let report = check_layer(spec.as_ref(), x, 5).unwrap();
        assert!(report.max() <= 1e-5, "{}: {report:?}", spec.name());
        assert_eq!(report.input.is_some(), i > 0, "{}", spec.name());
        assert_eq!(report.params.len(), spec.params().len());
        for p in spec.params() {
            let n = p.numel();
            let (pairs, _) = finite_differences(spec.as_ref(), x, 5, &p.name, &[0, n / 3, n - 1], 1e-2).unwrap();
            for (analytic, numeric) in pairs {
                assert!(
                    (analytic - numeric).abs() <= 2e-3 + 2e-2 * analytic.abs().max(numeric.abs()),
                    "{}: explicit {analytic} vs finite difference {numeric}",
                    p.name
                );
            }
        }
    }
}

/// A block keeps its projections' transposed weights between micro-batches; once told the
/// parameters changed in place (as after an optimizer step), its input gradient is a freshly
/// built block's, bit for bit.
#[test]
fn a_blocks_input_gradient_follows_its_parameters_once_told_they_changed() {
    let model = Gpt::new(GptConfig::custom(16, 8, 8, 2, 2).unwrap()).unwrap();
    let spec = &model.layers()[1];
    let mut store = ParamStore::new(Device::Cpu, 9);
    for p in spec.params() {
        store.get(&p).unwrap();
    }
    let x = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap();
    let dy = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap();
    let input_grad = |layer: &mut dyn Layer| -> Vec<u32> {
        let (_, saved) = layer.forward_train(&x, Pass::First).unwrap();
        let dx = layer.backward_input(saved, &dy, true).unwrap().0.unwrap();
        dx.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    };
    let mut layer = spec.build(&mut store.shared_view()).unwrap();
    assert_eq!(layer.kept_bytes(), 0, "nothing kept before the first input gradient");
    let before = input_grad(layer.as_mut());
    // The four projections' weights (c_attn 8x24, attention c_proj 8x8, c_fc 8x32, MLP c_proj
    // 32x8), transposed, in f32: what the profile counts with the parameters.
    assert_eq!(layer.kept_bytes(), 4 * (8 * 24 + 8 * 8 + 8 * 32 + 32 * 8));
    for (name, _, var) in store.vars() {
        if name.ends_with(".weight") {
            var.set(&(var.as_tensor() * 1.5).unwrap()).unwrap();
        }
    }
    layer.parameters_changed();
    assert_eq!(layer.kept_bytes(), 0, "the stale copies are dropped");
    let after = input_grad(layer.as_mut());
    let fresh = input_grad(spec.build(&mut store.shared_view()).unwrap().as_mut());
    assert_ne!(before, fresh, "the weights' change must reach the input gradient");
    assert_eq!(after, fresh);
}

/// At sequences of `FLASH_MIN_SEQUENCE` and longer a block's attention runs as flash
/// attention on the CPU (only the log-sum-exp saved); its explicit backward still matches
/// autograd through the reference composition.
#[test]
fn long_sequences_take_flash_attention_and_match_autograd() {
    use brigade_engine::gradcheck::check_layer;
    let t = brigade_kernels::FLASH_MIN_SEQUENCE + 3;
    let model = Gpt::new(GptConfig::custom(16, t, 8, 1, 2).unwrap()).unwrap();
    let block = model.layers()[1].clone();
    let hidden = (Tensor::randn(0f32, 1.0, (1, t, 8), &Device::Cpu).unwrap() * 2.0).unwrap();
    let report = check_layer(block.as_ref(), &hidden, 5).unwrap();
    assert!(report.max() <= 1e-5, "{report:?}");
    // It took the flash path: it kept (B, H, T) log-sum-exps, not (B, H, T, T) probabilities.
    // Built as a stage builds it: over detached views of the variables (no autograd graph).
    let mut store = ParamStore::new(Device::Cpu, 5);
    block.build(&mut store).unwrap();
    let mut layer = block.build(&mut store.shared_view()).unwrap();
    let (_, saved) = layer.forward_train(&hidden, Pass::First).unwrap();
    let biggest = saved.tensors().iter().map(|s| s.elem_count()).max().unwrap();
    assert!(biggest < 2 * t * t, "a T x T tensor was kept: {biggest} elements");
}

/// Central finite differences on a few entries of several parameters against autograd.
#[test]
fn gradients_match_finite_differences() {
    let cfg = GptConfig::custom(16, 8, 8, 2, 2).unwrap();
    let model = Gpt::new(cfg).unwrap();
    let mut store = ParamStore::new(Device::Cpu, 3);
    let mut layers = build_all(&model, &mut store);
    let x = ids(&[1, 5, 9, 2, 15, 0, 3, 3, 7, 11], 2, 5);
    let targets = Tensor::from_slice(&[5u32, 9, 2, 15, 0, 3, 3, 7, 11, 4], 10, &Device::Cpu).unwrap();
    let loss_of = |layers: &mut [Box<dyn Layer>]| -> Tensor {
        let logits = run(layers, &x).unwrap().reshape((10, 16)).unwrap();
        brigade_kernels::cross_entropy_sum(&logits, &targets).unwrap()
    };
    // GPT-2's 0.02-std embeddings make LayerNorm's input tiny, so a finite-difference step
    // would be a large relative change; scale them to a trained model's order of magnitude.
    for name in [WTE, WPE] {
        let var = store.var(name).unwrap();
        var.set(&(var.as_tensor() * 25.0).unwrap()).unwrap();
    }
    let grads = loss_of(&mut layers).backward().unwrap();
    let names = [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.attn.c_proj.weight",
        "transformer.h.1.mlp.c_fc.bias",
        "transformer.h.0.mlp.c_proj.weight",
        "transformer.ln_f.bias",
    ];
    for name in names {
        let var: Var = store.var(name).unwrap().clone();
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let analytic: Vec<f32> = analytic.to_vec1().unwrap();
        let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for &i in &[0usize, 3, base.len() / 2, base.len() - 1] {
            let eps = 1e-2f32;
            let mut eval = |delta: f32| -> f64 {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                let l = loss_of(&mut layers).to_scalar::<f32>().unwrap() as f64;
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                l
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
            let a = analytic[i] as f64;
            assert!(
                (numeric - a).abs() <= 1e-3 + 2e-2 * a.abs().max(numeric.abs()),
                "{name}[{i}]: autograd {a} vs finite difference {numeric}"
            );
        }
    }
}

/// Decoding with the KV cache (a 3-token prefill, then one token at a time) gives the
/// full forward's logits at every position; out-of-order offsets and positions past the
/// context are errors.
#[test]
fn incremental_forward_matches_full_forward() {
    let model = Gpt::from_preset("gpt-tiny").unwrap();
    let mut store = ParamStore::new(Device::Cpu, 7);
    let mut layers = build_all(&model, &mut store);
    let data: Vec<u32> = vec![3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 4, 62, 64, 33, 83, 27];
    let (b, t) = (2, 8);
    let full = run(&mut layers, &ids(&data, b, t)).unwrap(); // (B, T, V)
    let step = |layers: &mut [Box<dyn Layer>], x: &Tensor, offset: usize| {
        layers.iter_mut().try_fold(x.clone(), |h, l| l.forward_incremental(&h, offset)).unwrap()
    };
    let all = ids(&data, b, t);
    let mut pieces = vec![step(&mut layers, &all.narrow(1, 0, 3).unwrap(), 0)];
    for pos in 3..t {
        pieces.push(step(&mut layers, &all.narrow(1, pos, 1).unwrap(), pos));
    }
    let cached = Tensor::cat(&pieces, 1).unwrap();
    let diff = (&full - &cached).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "cached logits differ from the full forward by {diff}");
    // Starting again at 0 forgets the old sequence: same logits as the first time.
    let again = step(&mut layers, &all.narrow(1, 0, 3).unwrap(), 0);
    let d = (&again - &pieces[0]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(d, 0.0);
    let e =
        layers[1].forward_incremental(&Tensor::zeros((2, 1, 64), DType::F32, &Device::Cpu).unwrap(), 7).unwrap_err();
    assert!(e.to_string().contains("but 3 positions are cached"), "{e}");
    let e = layers[0].forward_incremental(&ids(&[1, 2], 1, 2), 63).unwrap_err();
    assert!(e.to_string().contains("positions 63..65 exceed the model's context length 64"), "{e}");
}

#[test]
fn bad_inputs_are_errors() {
    let model = Gpt::from_preset("gpt-tiny").unwrap();
    let mut store = ParamStore::new(Device::Cpu, 0);
    let mut layers = build_all(&model, &mut store);
    let emb = &mut layers[0];
    let too_long: Vec<u32> = vec![1; 65];
    let e = emb.forward(&ids(&too_long, 1, 65), Mode::Train).unwrap_err().to_string();
    assert!(e.contains("exceeds the model's context length 64"), "{e}");
    let e = emb.forward(&ids(&[1, 256], 1, 2), Mode::Train).unwrap_err().to_string();
    assert!(e.contains("token id 256 is out of range for vocabulary size 256"), "{e}");
    let neg = Tensor::from_slice(&[1i64, -1], (1, 2), &Device::Cpu).unwrap();
    let e = emb.forward(&neg, Mode::Train).unwrap_err().to_string();
    assert!(e.contains("token id -1"), "{e}");
    let floats = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
    let e = emb.forward(&floats, Mode::Train).unwrap_err().to_string();
    assert!(e.contains("integer token ids"), "{e}");
    let flat = Tensor::from_slice(&[1u32, 2], 2, &Device::Cpu).unwrap();
    assert!(emb.forward(&flat, Mode::Train).unwrap_err().to_string().contains("(B, T)"));
    let wrong_width = Tensor::zeros((1, 2, 32), DType::F32, &Device::Cpu).unwrap();
    let e = layers[1].forward(&wrong_width, Mode::Train).unwrap_err().to_string();
    assert!(e.contains("GPT block expects hidden states"), "{e}");

    let e = GptConfig::preset("gpt3").unwrap_err().to_string();
    assert!(e.contains("unknown model preset `gpt3`") && e.contains("gpt2-medium"), "{e}");
    let e = GptConfig::custom(10, 8, 10, 1, 3).unwrap_err().to_string();
    assert!(e.contains("divisible"), "{e}");
    assert!(Gpt::new(tiny().with_n_layer(0)).is_err());
}

#[test]
fn config_serde_and_overrides() {
    let cfg = GptConfig::preset("gpt2").unwrap().with_n_layer(6).with_n_positions(256);
    let json = serde_json::to_string(&cfg).unwrap();
    let back: GptConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    // Epsilon defaults when absent, as in HF config files that omit it.
    let back: GptConfig =
        serde_json::from_str(r#"{"vocab_size":256,"n_positions":64,"n_embd":64,"n_layer":2,"n_head":4}"#).unwrap();
    assert_eq!(back, tiny());
    assert_eq!(Gpt::new(back).unwrap().name(), "gpt-tiny");
    assert!(Gpt::new(cfg).unwrap().name().starts_with("gpt(vocab=50257"));
}

#[test]
fn init_follows_gpt2() {
    let model = Gpt::from_preset("gpt2").unwrap();
    let layers = model.layers();
    let specs = layers[1].params();
    let get = |n: &str| specs.iter().find(|p| p.name == n).unwrap().clone();
    assert_eq!(get("transformer.h.0.attn.c_attn.weight").init, Init::Normal { std: 0.02 });
    let proj = Init::Normal { std: 0.02 / 24f64.sqrt() };
    assert_eq!(get("transformer.h.0.attn.c_proj.weight").init, proj);
    assert_eq!(get("transformer.h.0.mlp.c_proj.weight").init, proj);
    assert_eq!(get("transformer.h.0.mlp.c_fc.bias").init, Init::Zeros);
    assert_eq!(get("transformer.h.0.ln_2.weight").init, Init::Ones);
    assert!(!get("transformer.h.0.ln_2.weight").weight_decay);
    assert!(get("transformer.h.0.mlp.c_fc.weight").weight_decay);
}

/// The head as the pipeline builds it, with `chunk_rows` rows per chunk of its fused loss.
fn head_with_chunks(
    cfg: &GptConfig,
    store: &mut ParamStore,
    chunk_rows: Option<usize>,
) -> crate::blocks::NormedLmHead<crate::blocks::LayerNorm> {
    use crate::blocks::{get_all, LayerNorm, LmHead, NormedLmHead};
    use brigade_engine::LayerSpec;
    let spec = HeadSpec { cfg: cfg.clone() };
    let [w, b, wte] = get_all(store, &spec.params()).unwrap();
    let norm = LayerNorm { weight: w, bias: b, eps: cfg.layer_norm_epsilon };
    let mut head = NormedLmHead::new("GPT head", cfg.n_positions, norm, LmHead { table: wte });
    head.chunk_rows = chunk_rows;
    head
}

/// The input gradient of the fused head's whole backward.
fn fused_dx(head: &mut impl Layer, x: &Tensor, input: &brigade_engine::LossInput<'_>) -> Tensor {
    let mut sums = brigade_engine::Gradients::new();
    let backward = brigade_engine::LossBackward::Full(&mut sums);
    let (_, saved) = head.forward_with_loss(x, input, backward, Pass::First).unwrap().unwrap();
    head.backward_input_from_loss(saved, true).unwrap().0.unwrap()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= tol * scale.max(1.0), "{what}: max |difference| {diff:e} (scale {scale:e})");
}

#[test]
fn fused_head_loss_matches_the_logits_then_loss_path() {
    use brigade_engine::loss::{microbatch_loss, microbatch_loss_backward};
    use brigade_engine::{Gradients, LossBackward, LossInput, LossKind};
    let cfg = GptConfig::custom(16, 8, 8, 1, 2).unwrap();
    let x = (Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap() * 2.0).unwrap();
    let targets = ids(&[1, 5, 9, 2, 15, 0, 3, 3, 7, 11], 2, 5);
    let global_terms = 13; // as if this micro-batch were part of a larger global batch

    // The unfused path: logits (B, T, V), the loss of them, and the backward from its gradient.
    let mut store = ParamStore::new(Device::Cpu, 4);
    let mut plain = head_with_chunks(&cfg, &mut store, None);
    let (logits, saved) = plain.forward_train(&x, Pass::First).unwrap();
    let want_loss = microbatch_loss(LossKind::CrossEntropy, &logits, &targets, global_terms).unwrap();
    let dlogits = microbatch_loss_backward(LossKind::CrossEntropy, &logits, &targets, global_terms).unwrap();
    let (want_dx, w) = plain.backward_input(saved, &dlogits, true).unwrap();
    let want_dx = want_dx.unwrap();
    let mut want = Gradients::new();
    plain.backward_weight(w, &mut want).unwrap();

    // Fused, in chunks of 1 row, 3 rows (a short last chunk) and all 10 at once.
    for rows in [Some(1), Some(3), None] {
        let mut fused = head_with_chunks(&cfg, &mut store, rows);
        let input = LossInput { kind: LossKind::CrossEntropy, targets: &targets, global_terms };
        let mut got = Gradients::new();
        let (loss, saved) =
            fused.forward_with_loss(&x, &input, LossBackward::Full(&mut got), Pass::First).unwrap().unwrap();
        let whole_loss = loss.to_vec0::<f32>().unwrap();
        let what = format!("chunks of {rows:?} rows");
        assert_close(&format!("{what}: loss"), &loss, &want_loss, 1e-6);
        // The table's gradient is already in the sums; the weight step adds ln_f's.
        assert!(got.get(WTE).is_some() && got.get("transformer.ln_f.weight").is_none(), "{what}");
        let (dx, w) = fused.backward_input_from_loss(saved, true).unwrap();
        fused.backward_weight(w, &mut got).unwrap();
        assert_close(&format!("{what}: dx"), &dx.unwrap(), &want_dx, 1e-5);
        for name in [WTE, "transformer.ln_f.weight", "transformer.ln_f.bias"] {
            assert_close(&format!("{what}: d {name}"), got.get(name).unwrap(), want.get(name).unwrap(), 1e-5);
        }
        // Without gradient sums (a forward that will be recomputed): the same loss, no sums.
        let (again, _) = fused.forward_with_loss(&x, &input, LossBackward::LossOnly, Pass::First).unwrap().unwrap();
        assert_close(&format!("{what}: loss without gradients"), &again, &want_loss, 1e-6);

        // A zero-bubble schedule's split: the table's gradient waits for the weight step,
        // which finds the chunks' dlogits kept, or (over the budget) computes them again. Either
        // way the same products are summed in the same order: bit for bit the whole backward.
        for keep in [usize::MAX, 0] {
            fused.keep_dlogits_bytes = keep;
            let what = format!("{what}, split, keeping at most {keep} bytes");
            let mut split = Gradients::new();
            let (loss, saved) =
                fused.forward_with_loss(&x, &input, LossBackward::InputOnly, Pass::First).unwrap().unwrap();
            assert_eq!(loss.to_vec0::<f32>().unwrap(), whole_loss, "{what}: loss");
            let (dx_split, w) = fused.backward_input_from_loss(saved, true).unwrap();
            assert!(split.get(WTE).is_none(), "{what}: nothing summed before the weight step");
            fused.backward_weight(w, &mut split).unwrap();
            let same = |a: &Tensor, b: &Tensor| {
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert!(same(&dx_split.unwrap(), &fused_dx(&mut fused, &x, &input)), "{what}: dx");
            for name in [WTE, "transformer.ln_f.weight", "transformer.ln_f.bias"] {
                assert!(same(split.get(name).unwrap(), got.get(name).unwrap()), "{what}: d {name}");
            }
        }
    }

    // Another loss kind is not fused: the stage takes it from the output as before.
    let mut head = head_with_chunks(&cfg, &mut store, None);
    let input = LossInput { kind: LossKind::MeanSquaredError, targets: &x, global_terms };
    assert!(head.forward_with_loss(&x, &input, LossBackward::LossOnly, Pass::First).unwrap().is_none());
    // Targets that do not match the positions, or ids past the vocabulary, are errors.
    let input = LossInput { kind: LossKind::CrossEntropy, targets: &ids(&[1, 2, 3, 4, 5], 1, 5), global_terms };
    let e = head.forward_with_loss(&x, &input, LossBackward::LossOnly, Pass::First).unwrap_err().to_string();
    assert!(e.contains("do not match the GPT head's positions (2, 5)"), "{e}");
    let bad = ids(&[1, 5, 9, 2, 16, 0, 3, 3, 7, 11], 2, 5);
    let input = LossInput { kind: LossKind::CrossEntropy, targets: &bad, global_terms };
    let mut sums = Gradients::new();
    let e = head.forward_with_loss(&x, &input, LossBackward::Full(&mut sums), Pass::First).unwrap_err().to_string();
    assert!(e.contains("target id 16"), "{e}");
}

#[test]
fn a_split_backward_leaves_the_heads_table_gradient_for_w() {
    use brigade_engine::compute::{LossTarget, Recompute, StageCompute};
    use brigade_engine::LossKind;
    let cfg = GptConfig::custom(16, 8, 8, 1, 2).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap();
    let target = LossTarget { targets: ids(&[1, 5, 9, 2, 15, 0, 3, 3, 7, 11], 2, 5), global_terms: 10 };
    let mut store = ParamStore::new(Device::Cpu, 4);
    let mut sums = Vec::new();
    for (split, recompute) in [(false, Recompute::Off), (true, Recompute::Off), (true, Recompute::Full)] {
        let head: Box<dyn Layer> = Box::new(head_with_chunks(&cfg, &mut store, Some(3)));
        let mut compute = StageCompute::new(vec![head], true, Some(LossKind::CrossEntropy), recompute);
        compute.set_split_backward(split);
        compute.forward(0, &x, Some(target.clone())).unwrap();
        compute.backward_input(0, None).unwrap();
        // After I: a schedule of B actions has the table's gradient summed already (in F); a
        // zero-bubble one (recomputing or not) has nothing summed until W.
        let early = compute.take_gradients();
        assert_eq!(early.contains_key(WTE), !split, "split {split}, recompute {recompute}");
        compute.backward_weight(0).unwrap();
        let mut all = compute.take_gradients();
        all.extend(early);
        sums.push(all);
    }
    for other in &sums[1..] {
        for (name, g) in &sums[0] {
            let same = g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == other[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(same, "{name} differs between the split and the whole backward");
        }
    }
}

#[test]
fn fused_head_evaluation_matches_the_logits_then_loss_path() {
    use brigade_engine::loss::{correct_predictions_on_device, microbatch_loss};
    use brigade_engine::{LossInput, LossKind};
    let cfg = GptConfig::custom(16, 8, 8, 1, 2).unwrap();
    let x = (Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap() * 2.0).unwrap();
    let mut store = ParamStore::new(Device::Cpu, 4);
    let mut head = head_with_chunks(&cfg, &mut store, Some(3));
    let logits = head.forward(&x, Mode::Eval).unwrap();
    // Targets that are the argmax in some rows (hits) and not in others.
    let best = logits.argmax(candle_core::D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let picked: Vec<u32> = best.iter().enumerate().map(|(i, &b)| if i % 3 == 0 { b } else { (b + 1) % 16 }).collect();
    let targets = ids(&picked, 2, 5);
    let want_loss = microbatch_loss(LossKind::CrossEntropy, &logits, &targets, 1).unwrap();
    let want_hits = correct_predictions_on_device(&logits, &targets).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(want_hits, 4);
    let input = LossInput { kind: LossKind::CrossEntropy, targets: &targets, global_terms: 1 };
    let (loss, hits) = head.eval_with_loss(&x, &input).unwrap().unwrap();
    assert_close("evaluation loss", &loss, &want_loss, 1e-6);
    assert_eq!(hits.to_scalar::<u32>().unwrap(), want_hits);
    // Targets that do not match the positions are an error.
    let input = LossInput { kind: LossKind::CrossEntropy, targets: &ids(&[1, 2, 3, 4, 5], 1, 5), global_terms: 1 };
    assert!(head.eval_with_loss(&x, &input).is_err());
}
