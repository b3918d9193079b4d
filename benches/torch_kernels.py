#!/usr/bin/env python3
"""PyTorch's equivalents of brigade's kernels, timed like `brigade kernels-bench`.

Same shapes (GPT-2 124M: B=8, T=1024, C=768, H=12, V=50257; --small: B=2, T=256, C=256,
H=4, 2 layers for AdamW), same byte and FLOP counts, same timing (rounds of 10 back-to-back
calls between two device synchronisations on a GPU, the median round) and the same columns, so
the two tables line up in the GPU check script:

    brigade kernels-bench --device cuda --peak-gbps 4800
    python3 benches/torch_kernels.py --device cuda --peak-gbps 4800

Equivalents: F.layer_norm (backward: autograd of it), F.gelu(x + b, approximate="tanh"),
F.cross_entropy(reduction="sum"), F.scaled_dot_product_attention(is_causal=True) (forward and
forward+backward; the rows are named like brigade's flash rows), torch.optim.AdamW(fused=True)
over GPT-2's parameter tensors. Backward rows time only the backward: the forward graph is built
once and differentiated with retain_graph. Fused AdamW needs gradients of the parameters' dtype,
so its gradients stay f32 under --dtype bf16 (brigade's kernel reads bf16 gradients there).
"""

import argparse
import time

import torch
import torch.nn.functional as F


def shapes(small):
    if small:
        return dict(b=2, t=256, c=256, h=4, v=50257, layers=2)
    return dict(b=8, t=1024, c=768, h=12, v=50257, layers=12)


def parameter_shapes(s):
    c, v, t = s["c"], s["v"], s["t"]
    out = [(v, c), (t, c)]
    for _ in range(s["layers"]):
        out += [(c,), (c,), (c, 3 * c), (3 * c,), (c, c), (c,)]
        out += [(c,), (c,), (c, 4 * c), (4 * c,), (4 * c, c), (c,)]
    return out + [(c,), (c,)]


def cases(s, dev, dtype):
    b, t, c, h, v = s["b"], s["t"], s["c"], s["h"], s["v"]
    n, d = b * t, c // h
    elem = torch.tensor([], dtype=dtype).element_size()
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, device=dev) * scale).to(dtype)

    x, w, bias, dy = rand(n, c), rand(c), rand(c), rand(n, c)
    yield "layer_norm_fwd", f"({n}, {c})", 2 * n * c * elem, None, lambda: F.layer_norm(x, (c,), w, bias, 1e-5)
    xr, wr, br = (z.clone().requires_grad_() for z in (x, w, bias))
    y = F.layer_norm(xr, (c,), wr, br, 1e-5)
    yield "layer_norm_bwd", f"({n}, {c})", 3 * n * c * elem, None, lambda: torch.autograd.grad(y, (xr, wr, br), dy, retain_graph=True)

    x4, b4, dy4 = rand(n, 4 * c), rand(4 * c), rand(n, 4 * c)
    yield "gelu_tanh_fwd", f"({n}, {4 * c})", 2 * n * 4 * c * elem, None, lambda: F.gelu(x4 + b4, approximate="tanh")
    x4r = x4.clone().requires_grad_()
    g4 = F.gelu(x4r + b4, approximate="tanh")
    yield "gelu_tanh_bwd", f"({n}, {4 * c})", 3 * n * 4 * c * elem, None, lambda: torch.autograd.grad(g4, x4r, dy4, retain_graph=True)

    logits = rand(n, v, scale=2.0)
    targets = torch.tensor([(i * 2654435761) % v for i in range(n)], device=dev)
    yield "cross_entropy_fwd", f"({n}, {v})", n * v * elem, None, lambda: F.cross_entropy(logits, targets, reduction="sum")
    lr_ = logits.clone().requires_grad_()
    loss = F.cross_entropy(lr_, targets, reduction="sum")
    yield "cross_entropy_bwd", f"({n}, {v})", 2 * n * v * elem, None, lambda: torch.autograd.grad(loss, lr_, retain_graph=True)

    qkv, dya = rand(b, t, 3 * c), rand(b, h, t, d)
    fwd_flops = 2.0 * b * h * t * t * d
    shape = f"B={b} T={t} H={h} d={d}"

    def heads(z):
        q, k, vv = z.split(c, dim=2)
        return [u.view(b, t, h, d).transpose(1, 2) for u in (q, k, vv)]

    yield "attention_sdpa_fwd", shape, None, fwd_flops, lambda: F.scaled_dot_product_attention(*heads(qkv), is_causal=True)
    qkvr = qkv.clone().requires_grad_()

    def fwd_bwd():
        out = F.scaled_dot_product_attention(*heads(qkvr), is_causal=True)
        return torch.autograd.grad(out, qkvr, dya)

    yield "attention_sdpa_fwd_bwd", shape, None, 3.5 * fwd_flops, fwd_bwd

    ps = [torch.nn.Parameter((torch.randn(*sh, device=dev) * 0.02).abs()) for sh in parameter_shapes(s)]
    for p in ps:
        p.grad = torch.randn_like(p) * 0.01
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW(ps, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=fused)
    count = sum(p.numel() for p in ps)
    # Reads param, m, v, grad (f32 here); writes param, m, v.
    yield "adamw_fused" if fused else "adamw", f"{len(ps)} tensors, {count / 1e6:.1f}M params", count * 28, None, opt.step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--only", default="")
    ap.add_argument("--peak-gbps", type=float, default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    s = shapes(args.small)
    inner = 10 if dev.type == "cuda" else 1
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    only = [w for w in args.only.split(",") if w]
    print(f"# torch {torch.__version__} kernels: device {dev}, dtype {args.dtype}, {args.repeats} rounds x {inner} (median), shapes {s}")
    print(f"{'kernel':32} {'shape':34} {'dtype':>6} {'median_ms':>11} {'GB/s':>9} {'%peak':>6} {'TFLOP/s':>8}")
    for name, shape, nbytes, flops, fn in cases(s, dev, dtype):
        if only and not any(w in name for w in only):
            continue

        def round_():
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            return (time.perf_counter() - start) / inner

        round_()  # warm-up: kernel selection, first allocations
        times = sorted(round_() for _ in range(args.repeats))
        secs = times[len(times) // 2]
        gbps = nbytes / secs / 1e9 if nbytes else None
        share = f"{100 * gbps / args.peak_gbps:.0f}%" if gbps and args.peak_gbps else "-"
        tflops = f"{flops / secs / 1e12:.3f}" if flops else "-"
        gb = f"{gbps:.1f}" if gbps else "-"
        print(f"{name:32} {shape:34} {args.dtype:>6} {secs * 1e3:>11.3f} {gb:>9} {share:>6} {tflops:>8}")


if __name__ == "__main__":
    main()
