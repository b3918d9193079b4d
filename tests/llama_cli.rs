//! The Llama family through the command line: listed by `presets`, trained across stages with
//! its shape flags, saved under Hugging Face names, resumed, decoded with the KV cache (the
//! same text as without it) and exported as a `LlamaForCausalLM` config; and the README's
//! worked example (own tokenizer, 2 stages, export with the tokenizer files), checked in
//! transformers by tests/hf/check_llama_export.py where torch and transformers are installed.

use std::path::PathBuf;
use std::process::{Command, Output};

fn brigade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brigade")).args(args).output().expect("run brigade")
}

/// Runs tests/hf/check_llama_export.py (with $BRIGADE_PYTHON, or python3): transformers loads
/// the export and its greedy generation equals `brigade generate`'s. The script skips, saying
/// why, where torch or transformers is missing; no Python at all skips here the same way.
fn check_in_transformers(checkpoint: &str, export: &std::path::Path, prompt: &str) {
    let python = std::env::var("BRIGADE_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hf/check_llama_export.py");
    let args = [
        script,
        "--brigade",
        env!("CARGO_BIN_EXE_brigade"),
        "--checkpoint",
        checkpoint,
        "--export",
        export.to_str().unwrap(),
        "--prompt",
        prompt,
    ];
    let out = match Command::new(&python).args(args).output() {
        Ok(out) => out,
        Err(e) => {
            println!("SKIP: no Python ({python}: {e}) for tests/hf/check_llama_export.py");
            return;
        }
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "check_llama_export.py failed:\n{text}");
    assert!(text.contains("OK: ") || text.contains("SKIP: "), "{text}");
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
    let text = ok(&["export", "--checkpoint", save_s, "--out", out.to_str().unwrap()]);
    assert!(text.contains("transformers.LlamaForCausalLM.from_pretrained("), "{text}");
    assert!(!text.contains("load_state_dict"), "{text}");
    let config = json(&out.join("config.json"));
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_key_value_heads"], 1);
    assert_eq!(config["intermediate_size"], 96);
    // A byte-level run exports its bytes as a tokenizer, with no special tokens.
    assert!(out.join("tokenizer.json").is_file() && out.join("tokenizer_config.json").is_file(), "{text}");
    assert_eq!(config["eos_token_id"], serde_json::Value::Null);
    check_in_transformers(save_s, &out, "The ");

    let err = brigade(&["train", "--model", "gpt-tiny", "--kv-heads", "2", "--steps", "1"]);
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("--kv-heads and --ffn shape a Llama-family model"));
    let _ = std::fs::remove_dir_all(&root);
}

fn json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// README's worked example, the Rust half: a tokenizer trained on a text file, `llama-tiny`
/// trained on that text across 2 stages, exported with the tokenizer files and config keys
/// that transformers needs; then, where transformers is installed, the Python half.
#[test]
fn readme_worked_example_own_tokenizer_two_stages_export() {
    let root: PathBuf = std::env::temp_dir().join(format!("brigade-llama-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let path = |name: &str| root.join(name).to_str().unwrap().to_string();
    let text = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let (tok, run, hf) = (path("tokenizer.json"), path("run"), path("hf"));

    let out = ok(&["tokenizer", "train", "--vocab-size", "384", text, "--out", &tok]);
    assert!(out.contains("trained a byte-level BPE tokenizer of 384 tokens"), "{out}");
    let out = ok(&[
        "train",
        "--model",
        "llama-tiny",
        "--data",
        text,
        "--tokenizer",
        &tok,
        "--stages",
        "2",
        "--steps",
        "20",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--save-dir",
        &run,
    ]);
    assert!(out.contains("pipeline 2 stages"), "{out}");
    let out = ok(&["export", "--checkpoint", &run, "--out", &hf]);
    assert!(out.contains(&format!("transformers.LlamaForCausalLM.from_pretrained({hf:?})")), "{out}");
    assert!(out.contains(&format!("transformers.AutoTokenizer.from_pretrained({hf:?})")), "{out}");

    let hf = PathBuf::from(hf);
    for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(hf.join(file).is_file(), "{file} missing from the export:\n{out}");
    }
    let config = json(&hf.join("config.json"));
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["vocab_size"], 384, "the model's vocabulary follows the tokenizer's");
    assert_eq!(config["max_position_embeddings"], 64);
    assert_eq!((config["num_attention_heads"].as_u64(), config["num_key_value_heads"].as_u64()), (Some(4), Some(2)));
    let tokenizer = brigade::tokenizer::TextTokenizer::load(&hf).unwrap();
    let end_of_text = tokenizer.end_of_text().expect("a trained tokenizer has <|endoftext|>");
    assert_eq!(config["eos_token_id"], end_of_text, "transformers' generate stops at the tokenizer's end of text");
    assert_eq!(config["bos_token_id"], end_of_text);
    let tokenizer_config = json(&hf.join("tokenizer_config.json"));
    assert_eq!(tokenizer_config["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(tokenizer_config["eos_token"], brigade::tokenizer::END_OF_TEXT);
    assert_eq!(tokenizer_config["model_max_length"], 64);
    // The exported tokenizer is the run's, byte for byte.
    assert_eq!(std::fs::read(hf.join("tokenizer.json")).unwrap(), std::fs::read(&tok).unwrap());

    check_in_transformers(&run, &hf, "The pipeline");
    let _ = std::fs::remove_dir_all(&root);
}
