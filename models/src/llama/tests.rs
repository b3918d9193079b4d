//! Llama tests: parameter counts and names against Hugging Face, causality, every layer's
//! explicit backward against autograd and finite differences (tied and untied heads,
//! grouped-query heads, q/k/v biases, Llama 3 RoPE scaling), KV-cache decoding, bad inputs.

use brigade_engine::layer::unique_params;
use brigade_engine::{InputKind, Layer, Mode, ParamStore, PipelineModel};
use candle_core::{DType, Device, Result, Tensor};

use super::*;

fn tiny() -> LlamaConfig {
    LlamaConfig::preset("llama-tiny").unwrap()
}

/// A small config for gradient checks: 4 query heads over 2 k/v heads, width 8 (head_dim 2).
fn small() -> LlamaConfig {
    tiny()
        .with_vocab_size(16)
        .with_max_position_embeddings(8)
        .with_num_attention_heads(4)
        .with_hidden_size(8)
        .with_intermediate_size(12)
        .with_num_hidden_layers(2)
        .with_num_key_value_heads(2)
}

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
    // `sum(p.numel() for p in LlamaForCausalLM(config).parameters())` of the published configs.
    let expected = [
        ("smollm2-135m", 134_515_008usize),
        ("smollm2-360m", 361_821_120),
        ("tinyllama-1.1b", 1_100_048_384),
        ("llama3.2-1b", 1_235_814_400),
        ("llama3-8b", 8_030_261_248),
    ];
    for (name, n) in expected {
        assert_eq!(Llama::from_preset(name).unwrap().num_params(), n, "{name}");
    }
    // llama-tiny: embed 256·64, 2 blocks · (2·64 norms + q 64·64 + k,v 2·64·32 + o 64·64 +
    // 3·64·128), final norm 64, untied head 256·64.
    let tiny = Llama::from_preset("llama-tiny").unwrap();
    assert_eq!(tiny.num_params(), 16384 + 2 * (128 + 4096 + 4096 + 4096 + 3 * 8192) + 64 + 16384);
    // With q/k/v biases (Qwen2-style): (H + 2·KV)·D more per block.
    let biased = Llama::new(tiny.config().clone().with_attention_bias(true)).unwrap();
    assert_eq!(biased.num_params(), tiny.num_params() + 2 * 128);
    // Tied: the table once in the model, in both layers' lists.
    let smol = Llama::from_preset("smollm2-135m").unwrap();
    let per_layer: usize = smol.layers().iter().map(|l| l.param_count()).sum();
    assert_eq!(per_layer, smol.num_params() + 49152 * 576);
}

#[test]
fn layer_list_and_hugging_face_names() {
    let model = Llama::from_preset("llama-tiny").unwrap();
    let names: Vec<String> = model.layers().iter().map(|l| l.name()).collect();
    assert_eq!(names, ["model.embed_tokens", "model.layers.0", "model.layers.1", "lm_head"]);
    let params = unique_params(&model.layers());
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    let p = "model.layers.1";
    let want = [
        "model.embed_tokens.weight".to_string(),
        format!("{p}.input_layernorm.weight"),
        format!("{p}.self_attn.q_proj.weight"),
        format!("{p}.self_attn.k_proj.weight"),
        format!("{p}.self_attn.v_proj.weight"),
        format!("{p}.self_attn.o_proj.weight"),
        format!("{p}.post_attention_layernorm.weight"),
        format!("{p}.mlp.gate_proj.weight"),
        format!("{p}.mlp.up_proj.weight"),
        format!("{p}.mlp.down_proj.weight"),
        "model.norm.weight".to_string(),
        "lm_head.weight".to_string(),
    ];
    for n in &want {
        assert!(names.contains(&n.as_str()), "missing {n}");
    }
    assert_eq!(params.len(), 2 + 2 * 9 + 1);
    let shape = |n: &str| params.iter().find(|p| p.name == n).unwrap().shape.clone();
    assert_eq!(shape("model.layers.0.self_attn.k_proj.weight"), [32, 64]); // nn.Linear (out, in)
    assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), [64, 128]);
    assert!(!params.iter().find(|p| p.name == "model.norm.weight").unwrap().weight_decay);
    assert_eq!(model.input(), InputKind::Tokens { vocab: 256, context: 64 });
    assert_eq!(model.name(), "llama-tiny");
    // Tied presets have no lm_head.weight.
    let smol = Llama::from_preset("smollm2-135m").unwrap();
    assert!(unique_params(&smol.layers()).iter().all(|p| p.name != "lm_head.weight"));
}

#[test]
fn causal_future_tokens_do_not_change_past_logits() {
    let model = Llama::from_preset("llama-tiny").unwrap();
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
fn check_every_layer(cfg: LlamaConfig) {
    use brigade_engine::gradcheck::{check_layer, finite_differences};
    let model = Llama::new(cfg).unwrap();
    let layers = model.layers();
    let ids = ids(&[1, 5, 9, 2, 15, 0, 3, 3, 7, 11], 2, 5);
    // Hidden states of a trained model's order of magnitude, so RMSNorm is well conditioned.
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

#[test]
fn explicit_backward_matches_autograd_and_finite_differences() {
    check_every_layer(small());
}

#[test]
fn explicit_backward_with_biases_tied_head_scaled_rope_and_one_kv_head() {
    let scaling = Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 4,
    };
    let mut cfg = small().with_attention_bias(true).with_tie_word_embeddings(true).with_num_key_value_heads(1);
    cfg.rope_scaling = Some(scaling);
    cfg.rope_theta = 50.0;
    check_every_layer(cfg.clone());
    // And plain multi-head attention (as many k/v heads as query heads).
    check_every_layer(cfg.with_num_key_value_heads(4));
}

/// Decoding with the KV cache (a 3-token prefill, then one token at a time) gives the full
/// forward's logits at every position; the cache holds only the k/v heads; out-of-order
/// offsets and positions past the context are errors.
#[test]
fn incremental_forward_matches_full_forward() {
    let model = Llama::from_preset("llama-tiny").unwrap();
    let mut store = ParamStore::new(Device::Cpu, 7);
    let mut layers = build_all(&model, &mut store);
    let data: Vec<u32> = vec![3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 4, 62, 64, 33, 83, 27];
    let (b, t) = (2, 8);
    let full = run(&mut layers, &ids(&data, b, t)).unwrap();
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
fn bad_inputs_and_configs_are_errors() {
    let model = Llama::from_preset("llama-tiny").unwrap();
    let mut store = ParamStore::new(Device::Cpu, 0);
    let mut layers = build_all(&model, &mut store);
    let e = layers[0].forward(&ids(&[1; 65], 1, 65), Mode::Train).unwrap_err().to_string();
    assert!(e.contains("exceeds the model's context length 64"), "{e}");
    let e = layers[0].forward(&ids(&[1, 256], 1, 2), Mode::Train).unwrap_err().to_string();
    assert!(e.contains("token id 256 is out of range for vocabulary size 256"), "{e}");
    let floats = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(layers[0].forward(&floats, Mode::Train).unwrap_err().to_string().contains("integer token ids"));
    let wrong_width = Tensor::zeros((1, 2, 32), DType::F32, &Device::Cpu).unwrap();
    let e = layers[1].forward(&wrong_width, Mode::Train).unwrap_err().to_string();
    assert!(e.contains("Llama block expects hidden states"), "{e}");

    let e = LlamaConfig::preset("llama4").unwrap_err().to_string();
    assert!(e.contains("unknown model preset `llama4`") && e.contains("smollm2-135m"), "{e}");
    let e = tiny().with_num_key_value_heads(3).validate().unwrap_err().to_string();
    assert!(e.contains("num_attention_heads (4) must be a multiple of num_key_value_heads (3)"), "{e}");
    let e = tiny().with_num_hidden_layers(0).validate().unwrap_err().to_string();
    assert!(e.contains("num_hidden_layers must be positive"), "{e}");
    let mut odd = tiny();
    odd.head_dim = 15;
    assert!(odd.validate().unwrap_err().to_string().contains("head_dim (15) must be even"));
    let mut eps = tiny();
    eps.rms_norm_eps = 0.0;
    assert!(eps.validate().unwrap_err().to_string().contains("rms_norm_eps"));
    let mut scaling = LlamaConfig::preset("llama3.2-1b").unwrap();
    scaling.rope_scaling.as_mut().unwrap().high_freq_factor = 0.5;
    assert!(scaling.validate().unwrap_err().to_string().contains("high_freq_factor"));
    let e = tiny().with_hidden_size(1 << 23).with_num_hidden_layers(1 << 20).validate().unwrap_err().to_string();
    assert!(e.contains("parameters, more than brigade supports"), "{e}");
    assert!(Llama::new(tiny().with_vocab_size(0)).is_err());
}

#[test]
fn config_serde_names_and_overrides() {
    let cfg = LlamaConfig::preset("llama3.2-1b").unwrap().with_num_hidden_layers(2);
    let json = serde_json::to_string(&cfg).unwrap();
    let back: LlamaConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    assert!(Llama::new(cfg).unwrap().name().starts_with("llama(vocab=128256"));
    // Through the family-tagged config checkpoints store.
    let tagged = crate::ModelConfig::preset("llama-tiny").unwrap();
    assert_eq!(crate::ModelConfig::from_json(&tagged.to_json()).unwrap(), tagged);
    assert_eq!(crate::preset("smollm2-360m").unwrap().name(), "smollm2-360m");
    assert!(crate::preset_names().contains(&"llama3-8b"));
    // Width and head overrides keep head_dim = width / heads.
    let wide = tiny().with_hidden_size(128).with_num_attention_heads(8);
    assert_eq!(wide.head_dim, 16);
    let hf = LlamaConfig::preset("llama3.2-1b").unwrap().hf_config_json();
    assert_eq!(hf["num_key_value_heads"], 8);
    assert_eq!(hf["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(hf["rope_parameters"]["rope_theta"], 500000.0);
}

#[test]
fn hugging_face_config_json_of_every_transformers_version() {
    // brigade's own export reads back to the same config, for every preset.
    for name in PRESET_NAMES {
        let cfg = LlamaConfig::preset(name).unwrap();
        assert_eq!(LlamaConfig::from_hf_config_json(&cfg.hf_config_json()).unwrap(), cfg, "{name}");
    }
    // Llama 3.2 as transformers 4.x wrote it: rope_theta and rope_scaling, no head_dim.
    let old = serde_json::json!({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": true, "hidden_act": "silu"
    });
    assert_eq!(LlamaConfig::from_hf_config_json(&old).unwrap(), LlamaConfig::preset("llama3.2-1b").unwrap());
    // As 5.x writes it: rope_parameters.
    let mut new = old.clone();
    new.as_object_mut().unwrap().remove("rope_theta");
    new["rope_parameters"] = new["rope_scaling"].clone();
    new["rope_parameters"]["rope_theta"] = 500000.0.into();
    new.as_object_mut().unwrap().remove("rope_scaling");
    assert_eq!(LlamaConfig::from_hf_config_json(&new).unwrap(), LlamaConfig::preset("llama3.2-1b").unwrap());
    // What brigade cannot build is refused by name.
    let mut yarn = new.clone();
    yarn["rope_parameters"]["rope_type"] = "yarn".into();
    let e = LlamaConfig::from_hf_config_json(&yarn).unwrap_err().to_string();
    assert!(e.contains("rope_type `yarn` is not supported"), "{e}");
    let mut gelu = old.clone();
    gelu["hidden_act"] = "gelu".into();
    assert!(LlamaConfig::from_hf_config_json(&gelu).unwrap_err().to_string().contains("hidden_act `gelu`"));
    let mut missing = old;
    missing.as_object_mut().unwrap().remove("vocab_size");
    assert!(LlamaConfig::from_hf_config_json(&missing).unwrap_err().to_string().contains("vocab_size is missing"));
}
