//! ResNet tests: parameter counts and names against torchvision, shapes, BatchNorm buffers, every
//! layer's explicit backward against autograd and finite differences, bad inputs.

use std::collections::HashMap;

use brigade_engine::layer::unique_params;
use brigade_engine::{Init, InputKind, Layer, LossKind, Mode, ParamSpec, ParamStore, PipelineModel};
use candle_core::{DType, Device, Result, Tensor, Var};

use super::*;

#[test]
fn absurd_sizes_are_refused() {
    let e = ResNetConfig::custom(BlockKind::BasicBlock, [2, 2, 2, 2], usize::MAX, 10).unwrap_err().to_string();
    assert!(e.contains("is larger than brigade supports"), "{e}");
    let e = ResNetConfig::custom(BlockKind::Bottleneck, [1 << 20, 1, 1, 1], 1 << 12, 10).unwrap_err().to_string();
    assert!(e.contains("parameters, more than brigade supports"), "{e}");
    ResNetConfig::custom(BlockKind::Bottleneck, [3, 8, 36, 3], 64, 1000).unwrap();
    // ResNet-152
}

fn build_all(model: &dyn PipelineModel, store: &mut ParamStore) -> Vec<Box<dyn Layer>> {
    model.layers().iter().map(|l| l.build(store).unwrap()).collect()
}

fn run(layers: &mut [Box<dyn Layer>], x: &Tensor, mode: Mode) -> Result<Tensor> {
    let mut h = x.clone();
    for l in layers.iter_mut() {
        h = l.forward(&h, mode)?;
    }
    Ok(h)
}

/// Deterministic pseudo-random images in [-1, 1].
fn images(n: usize, c: usize, hw: usize) -> Tensor {
    let data: Vec<f32> = (0..n * c * hw * hw).map(|i| ((i * 7919 % 1009) as f32 / 504.5) - 1.0).collect();
    Tensor::from_vec(data, (n, c, hw, hw), &Device::Cpu).unwrap()
}

#[test]
fn param_counts_match_torchvision() {
    for (name, n) in [("resnet18", 11_689_512usize), ("resnet34", 21_797_672), ("resnet50", 25_557_032)] {
        assert_eq!(ResNet::from_preset(name).unwrap().num_params(), n, "{name}");
    }
    // resnet-tiny by hand: stem 8·3·49 + 16; layer1.0 2·(8·8·9) + 32;
    // layer2.0 16·8·9 + 16·16·9 + 64 + (16·8 + 32); layer3.0, layer4.0 likewise; fc 64·10 + 10.
    let by_hand = (1176 + 16) + (1152 + 32) + (3456 + 64 + 160) + (13824 + 128 + 576) + (55296 + 256 + 2176) + 650;
    assert_eq!(ResNet::from_preset("resnet-tiny").unwrap().num_params(), by_hand);
}

#[test]
fn layer_list_and_torchvision_names() {
    let model = ResNet::from_preset("resnet18").unwrap();
    let names: Vec<String> = model.layers().iter().map(|l| l.name()).collect();
    assert_eq!(names.len(), 1 + 8 + 1);
    assert_eq!(names[0], "stem");
    assert_eq!(
        names[1..9],
        ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    );
    assert_eq!(names[9], "fc");
    let params: Vec<ParamSpec> = unique_params(&model.layers());
    let has = |n: &str| params.iter().any(|p| p.name == n);
    for n in [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.weight",
        "fc.weight",
        "fc.bias",
    ] {
        assert!(has(n), "missing {n}");
    }
    assert!(!has("layer1.0.downsample.0.weight")); // basic layer1 keeps the shape
    assert!(!has("bn1.running_mean")); // buffers are not parameters
                                       // resnet50: bottleneck, downsample already in layer1.0 (64 → 256), stride on conv2.
    let r50 = ResNet::from_preset("resnet50").unwrap();
    let layers = r50.layers();
    assert_eq!(layers.len(), 1 + 16 + 1);
    let l2 = layers.iter().find(|l| l.name() == "layer2.0").unwrap().params();
    let shape = |n: &str| l2.iter().find(|p| p.name == n).map(|p| p.shape.clone());
    assert_eq!(shape("layer2.0.conv1.weight"), Some(vec![128, 256, 1, 1]));
    assert_eq!(shape("layer2.0.conv2.weight"), Some(vec![128, 128, 3, 3]));
    assert_eq!(shape("layer2.0.conv3.weight"), Some(vec![512, 128, 1, 1]));
    assert_eq!(shape("layer2.0.downsample.0.weight"), Some(vec![512, 256, 1, 1]));
    assert!(unique_params(&layers).iter().any(|p| p.name == "layer1.0.downsample.1.bias"));
    let fc = unique_params(&layers).into_iter().find(|p| p.name == "fc.weight").unwrap();
    assert_eq!(fc.shape, vec![1000, 2048]);
    assert_eq!(fc.init, Init::Uniform { bound: 1.0 / 2048f64.sqrt() });
}

#[test]
fn forward_shapes_basic_and_bottleneck() {
    let tiny = ResNet::from_preset("resnet-tiny").unwrap();
    let mut store = ParamStore::new(Device::Cpu, 0);
    let mut layers = build_all(&tiny, &mut store);
    let x = images(2, 3, 32);
    let mut h = x.clone();
    let mut shapes = Vec::new();
    for l in layers.iter_mut() {
        h = l.forward(&h, Mode::Train).unwrap();
        shapes.push(h.dims().to_vec());
    }
    assert_eq!(
        shapes,
        [vec![2, 8, 8, 8], vec![2, 8, 8, 8], vec![2, 16, 4, 4], vec![2, 32, 2, 2], vec![2, 64, 1, 1], vec![2, 10]]
    );
    assert_eq!(run(&mut layers, &x, Mode::Eval).unwrap().dims(), &[2, 10]);

    let cfg = ResNetConfig::custom(BlockKind::Bottleneck, [1, 2, 1, 1], 4, 7).unwrap();
    let model = ResNet::new(cfg).unwrap();
    let mut store = ParamStore::new(Device::Cpu, 0);
    let mut layers = build_all(&model, &mut store);
    assert_eq!(run(&mut layers, &images(2, 3, 16), Mode::Train).unwrap().dims(), &[2, 7]);
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn buffers_round_trip_and_errors() {
    let model = ResNet::from_preset("resnet-tiny").unwrap();
    let mut store = ParamStore::new(Device::Cpu, 0);
    let mut layers = build_all(&model, &mut store);
    run(&mut layers, &images(2, 3, 32), Mode::Train).unwrap();
    let stem: HashMap<String, Tensor> = layers[0].buffers().into_iter().collect();
    let mut keys: Vec<_> = stem.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["bn1.num_batches_tracked", "bn1.running_mean", "bn1.running_var"]);
    assert_eq!(stem["bn1.num_batches_tracked"].dtype(), DType::I64);
    assert_eq!(stem["bn1.num_batches_tracked"].to_scalar::<i64>().unwrap(), 1);
    let l2: Vec<String> = layers[2].buffers().into_iter().map(|(k, _)| k).collect();
    assert!(l2.contains(&"layer2.0.downsample.1.running_var".to_string()), "{l2:?}");
    assert_eq!(l2.len(), 9);

    // Load into a fresh model: Eval outputs then match.
    let mut store2 = ParamStore::new(Device::Cpu, 0);
    let mut fresh = build_all(&model, &mut store2);
    for (a, b) in layers.iter().zip(fresh.iter_mut()) {
        b.load_buffers(&a.buffers().into_iter().collect()).unwrap();
    }
    let x = images(2, 3, 32);
    let ya = vals(&run(&mut layers, &x, Mode::Eval).unwrap());
    let yb = vals(&run(&mut fresh, &x, Mode::Eval).unwrap());
    close(&ya, &yb);

    let mut bad = stem.clone();
    bad.insert("bn2.running_mean".into(), Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap());
    let e = fresh[0].load_buffers(&bad).unwrap_err().to_string();
    assert!(e.contains("unknown buffers") && e.contains("bn2.running_mean"), "{e}");
    let mut missing = stem.clone();
    missing.remove("bn1.running_var");
    assert!(fresh[0].load_buffers(&missing).unwrap_err().to_string().contains("missing buffer bn1.running_var"));
}

/// Checks autograd's gradient of `loss` against central finite differences on a few entries
/// of each named parameter. f32 and ReLU kinks limit how small `eps` can usefully be.
fn check_grads(store: &ParamStore, names: &[&str], eps: f32, mut loss: impl FnMut() -> Tensor) {
    let grads = loss().backward().unwrap();
    for name in names {
        let var: Var = store.var(name).unwrap().clone();
        let analytic = vals(grads.get(var.as_tensor()).unwrap());
        let base = vals(var.as_tensor());
        for &i in &[0usize, base.len() / 3, base.len() - 1] {
            let mut eval = |delta: f32| -> f64 {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                let l = loss().to_scalar::<f32>().unwrap() as f64;
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                l
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
            let a = analytic[i] as f64;
            assert!(
                (numeric - a).abs() <= 2e-3 + 2e-2 * a.abs().max(numeric.abs()),
                "{name}[{i}]: autograd {a} vs finite difference {numeric}"
            );
        }
    }
}

/// The whole network in training mode (micro-batch statistics in every BatchNorm).
/// Every layer's hand-written backward against autograd and finite differences: the stem,
/// basic blocks with and without a downsampling shortcut, bottlenecks, and the head.
#[test]
fn explicit_backward_matches_autograd_and_finite_differences() {
    use brigade_engine::gradcheck::{check_layer, finite_differences};
    for kind in [BlockKind::BasicBlock, BlockKind::Bottleneck] {
        let model = ResNet::new(ResNetConfig::custom(kind, [1, 2, 1, 1], 4, 5).unwrap()).unwrap();
        // 64×64 leaves layer4 a 2×2 map: BatchNorm on a 1×1 map with 2 images has a zero true
        // input gradient, and two implementations then only agree on rounding noise.
        let mut x = images(2, 3, 64);
        let mut store = ParamStore::new(Device::Cpu, 9);
        for spec in model.layers() {
            let report = check_layer(spec.as_ref(), &x, 9).unwrap();
            // BatchNorm's input gradient is a difference of near-equal terms, which the
            // closed form and autograd's composition round differently (up to ~2e-5 seen).
            assert!(report.max() <= 1e-4, "{kind:?} {}: {report:?}", spec.name());
            for p in spec.params().iter().take(4) {
                let n = p.numel();
                let (pairs, scale) =
                    finite_differences(spec.as_ref(), &x, 9, &p.name, &[0, n / 2, n - 1], 1e-3).unwrap();
                for (analytic, numeric) in pairs {
                    // Judged against the whole gradient's scale, loosely: a step of 1e-3 moves a
                    // few values across ReLU and max-pool kinks, each worth an O(1) error in
                    // the quotient, and f32 forwards add noise / eps. The tight check is the
                    // one against autograd above; this one catches signs and missing factors.
                    assert!(
                        (analytic - numeric).abs() <= 5e-2 * scale.max(numeric.abs()),
                        "{kind:?} {}: explicit {analytic} vs finite difference {numeric}",
                        p.name
                    );
                }
            }
            x = spec.build(&mut store).unwrap().forward(&x, Mode::Train).unwrap().detach();
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let model = ResNet::from_preset("resnet-tiny").unwrap();
    let mut store = ParamStore::new(Device::Cpu, 5);
    let mut layers = build_all(&model, &mut store);
    let x = images(3, 3, 32);
    let targets = Tensor::from_slice(&[1u32, 4, 7], 3, &Device::Cpu).unwrap();
    let names = [
        "layer1.0.conv2.weight",
        "layer1.0.bn1.weight",
        "layer2.0.downsample.0.weight",
        "layer3.0.bn2.bias",
        "layer4.0.conv1.weight",
        "fc.weight",
        "fc.bias",
    ];
    check_grads(&store, &names, 1e-3, || {
        brigade_kernels::cross_entropy_sum(&run(&mut layers, &x, Mode::Train).unwrap(), &targets).unwrap()
    });
}

/// The stem alone (conv, BatchNorm, ReLU, padded max-pool), in training and eval mode: as
/// the first layer it sees every downstream kink, so it is checked on its own.
#[test]
fn stem_gradients_match_finite_differences() {
    let model = ResNet::from_preset("resnet-tiny").unwrap();
    let mut store = ParamStore::new(Device::Cpu, 6);
    let mut stem = model.layers()[0].build(&mut store).unwrap();
    let x = images(2, 3, 16);
    let r = images(2, 8, 4).affine(0.7, 0.1).unwrap(); // a fixed random projection
    for mode in [Mode::Train, Mode::Eval] {
        check_grads(&store, &["conv1.weight", "bn1.weight", "bn1.bias"], 1e-3, || {
            (stem.forward(&x, mode).unwrap() * &r).unwrap().sum_all().unwrap()
        });
    }
}

#[test]
fn bad_inputs_are_errors() {
    let model = ResNet::from_preset("resnet-tiny").unwrap();
    let mut store = ParamStore::new(Device::Cpu, 0);
    let mut layers = build_all(&model, &mut store);
    let e = layers[0].forward(&images(1, 1, 32), Mode::Train).unwrap_err().to_string();
    assert!(e.contains("expects 3 input channels, got 1"), "{e}");
    let u8s = Tensor::zeros((1, 3, 8, 8), DType::U8, &Device::Cpu).unwrap();
    assert!(layers[0].forward(&u8s, Mode::Train).unwrap_err().to_string().contains("f32"));
    let flat = Tensor::zeros((3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(layers[0].forward(&flat, Mode::Train).unwrap_err().to_string().contains("4-D"));
    // One value per channel cannot be batch-normalised in training (PyTorch refuses too).
    let e = run(&mut layers, &images(1, 3, 32), Mode::Train).unwrap_err().to_string();
    assert!(e.contains("more than one value per channel"), "{e}");
    assert_eq!(run(&mut layers, &images(1, 3, 32), Mode::Eval).unwrap().dims(), &[1, 10]);

    let e = ResNetConfig::preset("resnet101").unwrap_err().to_string();
    assert!(e.contains("unknown model preset `resnet101`") && e.contains("resnet50"), "{e}");
    assert!(ResNetConfig::custom(BlockKind::BasicBlock, [1, 0, 1, 1], 8, 10).is_err());
    assert!(ResNet::new(ResNetConfig::preset("resnet18").unwrap().with_num_classes(0)).is_err());
}

#[test]
fn config_serde_names_and_overrides() {
    let cfg = ResNetConfig::preset("resnet50").unwrap().with_num_classes(10);
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(json.contains("\"bottleneck\""), "{json}");
    assert_eq!(serde_json::from_str::<ResNetConfig>(&json).unwrap(), cfg);
    let model = ResNet::new(cfg).unwrap();
    assert_eq!(model.name(), "resnet50(classes=10, in_channels=3)");
    assert_eq!(model.num_classes(), 10);
    assert_eq!(ResNet::from_preset("resnet-tiny").unwrap().name(), "resnet-tiny");
    assert_eq!(model.input(), InputKind::Images { channels: 3 });
    assert_eq!(model.loss(), LossKind::CrossEntropy);
}

#[test]
fn lib_preset_dispatch() {
    let names = crate::preset_names();
    assert_eq!(names.len(), 15); // 5 GPT, 6 Llama, 4 ResNet
    for n in &names {
        assert_eq!(crate::preset(n).unwrap().name(), *n);
    }
    let e = crate::preset("vgg16").unwrap_err().to_string();
    assert!(e.contains("`vgg16`") && e.contains("gpt2-xl") && e.contains("resnet-tiny"), "{e}");
}
