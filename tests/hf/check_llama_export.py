#!/usr/bin/env python3
"""Check a `brigade export` of a Llama checkpoint in Hugging Face transformers: the directory
loads with `AutoTokenizer.from_pretrained` and `LlamaForCausalLM.from_pretrained` (no missing
or unexpected keys); transformers' greedy `generate` writes the same text as `brigade generate`
on the checkpoint it was exported from; and the logits of that text (every position) match
`brigade predict`'s to --tol. (A small model's greedy text is often one token repeated, which
few mistakes would change; the logits catch the rest.)

    check_llama_export.py --brigade BIN --checkpoint RUN --export DIR [--prompt TEXT] [--tokens N]

Without torch and transformers it prints why it is skipping and exits 0 (tests/llama_cli.rs
runs it with $BRIGADE_PYTHON, or python3). Any mismatch exits 1.

If transformers stops early at the tokenizer's end-of-text id (config.json's eos_token_id),
its text must be where brigade's, which always writes --tokens tokens, starts.
"""

import argparse
import subprocess
import sys

sys.dont_write_bytecode = True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--brigade", required=True, help="the brigade binary")
    p.add_argument("--checkpoint", required=True, help="the brigade run or checkpoint that was exported")
    p.add_argument("--export", required=True, help="the directory `brigade export` wrote")
    p.add_argument("--prompt", default="The model")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--tol", type=float, default=1e-4, help="largest |logit difference| allowed")
    args = p.parse_args()

    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"SKIP: check_llama_export.py needs torch and transformers ({e})")
        return 0

    tok = transformers.AutoTokenizer.from_pretrained(args.export)
    model, info = transformers.LlamaForCausalLM.from_pretrained(args.export, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        print(f"FAIL: loading {args.export}: {bad}")
        return 1
    # brigade generates from its f32 checkpoint, whatever --dtype the export has.
    model = model.float().eval()

    inputs = tok(args.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=args.tokens,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        )
    new_ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    hf_text = tok.decode(out[0].tolist())

    run = subprocess.run(
        [args.brigade, "generate", "--checkpoint", args.checkpoint, "--prompt", args.prompt,
         "--tokens", str(args.tokens), "--temperature", "0"],
        capture_output=True, text=True, check=False,
    )
    if run.returncode != 0:
        print(f"FAIL: brigade generate exited {run.returncode}:\n{run.stderr}")
        return 1
    brigade_text = run.stdout[:-1] if run.stdout.endswith("\n") else run.stdout

    stopped_early = len(new_ids) < args.tokens
    same = brigade_text.startswith(hf_text) if stopped_early else brigade_text == hf_text
    print(f"prompt ids     {inputs['input_ids'][0].tolist()}")
    print(f"transformers   {hf_text!r}" + (" (stopped at eos)" if stopped_early else ""))
    print(f"brigade        {brigade_text!r}")
    if not same:
        print("FAIL: greedy generations differ")
        return 1

    # The logits of the whole generated sequence, in transformers and in brigade.
    import os
    import tempfile

    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        ids_file, logits_file = os.path.join(tmp, "ids.safetensors"), os.path.join(tmp, "logits.safetensors")
        save_file({"input_ids": out.contiguous()}, ids_file)
        run = subprocess.run(
            [args.brigade, "predict", "--checkpoint", args.checkpoint, "--input", ids_file, "--output", logits_file],
            capture_output=True, text=True, check=False,
        )
        if run.returncode != 0:
            print(f"FAIL: brigade predict exited {run.returncode}:\n{run.stderr}")
            return 1
        brigade_logits = load_file(logits_file)["logits"].double()
    with torch.no_grad():
        hf_logits = model(input_ids=out).logits.double()
    diff = (hf_logits - brigade_logits).abs().max().item()
    print(f"logits         max |transformers - brigade predict| {diff:.2e} over {tuple(hf_logits.shape)}")
    if not diff <= args.tol:
        print(f"FAIL: logits differ by more than {args.tol}")
        return 1
    print(f"OK: {args.tokens} greedy tokens and the logits agree ({type(tok).__name__}, transformers {transformers.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
