//! The Llama family through the command line: listed by `presets`, trained across stages with
//! its shape flags, saved under Hugging Face names, resumed, decoded with the KV cache (the
//! same text as without it) and exported as a `LlamaForCausalLM` config.

use std::path::PathBuf;
use std::process::{Command, Output};

fn brigade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brigade")).args(args).output().expect("run brigade")
}

fn ok(args: &[&str]) -> String {
    let out = brigade(args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "brigade {args:?} failed:\n{text}");
    text
}

#[test]
fn llama_presets_train_resume_generate_and_export() {
    let presets = ok(&["presets"]);
    for line in ["llama-tiny              106816       4", "smollm2-135m         134515008      32"] {
        assert!(presets.contains(line), "{presets}");
    }

    let root: PathBuf = std::env::temp_dir().join(format!("brigade-llama-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let save = root.join("run");
    let save_s = save.to_str().unwrap();
    let shape = ["--model", "llama-tiny", "--layers", "3", "--kv-heads", "1", "--ffn", "96"];
    let mut args = vec!["train", "--stages", "2", "--steps", "4", "--save-dir", save_s, "--save-every", "2"];
    args.extend(shape);
    let text = ok(&args);
    assert!(text.contains("pipeline 2 stages"), "{text}");
    // A shape flag that conflicts with the run is an error, never ignored; the same value is fine.
    for (flag, value) in [("--kv-heads", "2"), ("--ffn", "64"), ("--layers", "4")] {
        let err = brigade(&["train", "--resume", save_s, "--steps", "6", flag, value]);
        let stderr = String::from_utf8_lossy(&err.stderr);
        assert_eq!(err.status.code(), Some(1), "{flag} {value}: {stderr}");
        assert!(stderr.contains(&format!("{flag} {value} conflicts with the checkpoint")), "{stderr}");
    }
    let text = ok(&["train", "--resume", save_s, "--steps", "6", "--stages", "2", "--kv-heads", "1"]);
    assert!(text.contains("step 4 to 6"), "{text}");
    let inspect = ok(&["inspect", save_s]);
    assert!(inspect.contains("\"num_key_value_heads\":1"), "{inspect}");
    // Checkpoints keep Hugging Face's names.
    let index = std::fs::read_to_string(save.join("step-00000004").join("model.safetensors.index.json")).unwrap();
    for name in ["model.layers.2.self_attn.k_proj.weight", "model.norm.weight", "lm_head.weight"] {
        assert!(index.contains(name), "{name} missing from:\n{index}");
    }

    let gen = |extra: &[&str]| {
        let mut a = vec!["generate", "--checkpoint", save_s, "--prompt-ids", "84,104,101,32", "--tokens", "12"];
        a.extend(extra);
        ok(&a).lines().next().unwrap_or_default().to_string()
    };
    assert_eq!(gen(&[]), gen(&["--no-cache"]));

    let out = root.join("hf");
    ok(&["export", "--checkpoint", save_s, "--out", out.to_str().unwrap()]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_key_value_heads"], 1);
    assert_eq!(config["intermediate_size"], 96);

    let err = brigade(&["train", "--model", "gpt-tiny", "--kv-heads", "2", "--steps", "1"]);
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("--kv-heads and --ffn shape a Llama-family model"));
    let _ = std::fs::remove_dir_all(&root);
}
