"""GPU time of one decoder layer's forward+backward, per PyTorch op: where a layer spends its time besides the
attention op, against transformers' Llama decoder layer of the same shape.

One PaTH block (attention with path-lm's Triton op, the gated MLP, two RMSNorms; forget gate on) and one
LlamaDecoderLayer (SDPA, RoPE), hidden 1024 by default, float32 parameters under bf16 autocast, a float32
residual stream as in a model; the gradients set to None between steps (as a training step's zero_grad).
PaTH runs with the gated MLP's SiLU kernel (path_triton.gated_silu, the default on CUDA) and without it (the
MLP's module calls). Prints each case's GPU time per layer (torch.profiler, mean of --iters steps) and, for
the first case, the aten ops with the most GPU time, each with the chain of ops that called it.

    python benchmarks/gpu_layer_ops.py [--batch 2] [--seq 4096] [--heads 16] [--iters 5] [--rows 25]
"""

from __future__ import annotations

import argparse
import collections
from unittest import mock

import _common as C
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from path_lm import PaTHConfig, modeling_path
from path_lm.modeling_path import PaTHBlock


def profiled(step, iters: int):
    """(GPU us per step, {op chain: [us per step, calls per step]}) over iters steps after two warm-ups."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / iters
    ops = collections.defaultdict(lambda: [0.0, 0.0])
    for e in prof.events():
        if e.device_type != DeviceType.CPU or e.self_device_time_total <= 0:
            continue
        chain, parent = [e.name], e.cpu_parent
        while parent is not None and len(chain) < 4:
            chain.append(parent.name.removeprefix("autograd::engine::evaluate_function: ")[:40])
            parent = parent.cpu_parent
        ops[" <- ".join(chain)][0] += e.self_device_time_total / iters
        ops[" <- ".join(chain)][1] += 1 / iters
    return total, ops


def layer_step(layer, x, *args, **kwargs):
    def step():
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25, help="ops listed for the first case")
    C.add_common_args(parser, "gpu_layer_ops")
    args = parser.parse_args()
    device = C.pick_device(args)
    if device.type != "cuda":
        raise SystemExit("gpu_layer_ops.py measures GPU kernels; run it on a CUDA device")
    torch.manual_seed(0)
    B, T = args.batch, args.seq
    config = PaTHConfig(hidden_size=args.hidden, num_heads=args.heads, use_forget_gate=True, attn_backend="triton")
    llama_config = LlamaConfig(hidden_size=args.hidden, num_attention_heads=args.heads,
                               num_key_value_heads=args.heads, intermediate_size=config.intermediate_size,
                               attn_implementation="sdpa")
    x = torch.randn(B, T, args.hidden, device=device, requires_grad=True)
    with torch.device(device):
        path = PaTHBlock(config, 0)
        llama = LlamaDecoderLayer(llama_config, layer_idx=0)
        cos, sin = LlamaRotaryEmbedding(llama_config)(x, torch.arange(T, device=device)[None].expand(B, T))
    usable = modeling_path.gated_silu_usable
    cases = {}
    for fused in (True, False):
        with mock.patch.object(modeling_path, "gated_silu_usable", lambda *a: fused and usable(*a)):
            name = "PaTH block, MLP through the SiLU kernel" if fused else "PaTH block, MLP as module calls"
            cases[name] = profiled(layer_step(path, x), args.iters)
    cases["Llama decoder layer (SDPA, RoPE)"] = profiled(
        layer_step(llama, x, position_embeddings=(cos, sin), attention_mask=None), args.iters)
    env = C.environment(device)
    print(f"# {env['device']}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; "
          f"{env['date']}")
    print(f"# batch {B} x {T}, hidden {args.hidden}, {args.heads} heads, intermediate {config.intermediate_size}, "
          f"bf16 autocast; us of GPU kernels per forward+backward (torch.profiler)")
    llama_us = cases["Llama decoder layer (SDPA, RoPE)"][0]
    print(C.markdown_table(["layer", "fwd+bwd us", "vs Llama's"],
                           [[name, f"{us:.0f}", f"{us / llama_us:.2f}x"] for name, (us, _) in cases.items()]))
    name, (_, ops) = next(iter(cases.items()))
    print(f"\n# {name}: the ops with the most GPU time")
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[: args.rows]
    print(C.markdown_table(["us", "calls", "op <- callers"], [[f"{us:.1f}", f"{n:.0f}", chain] for chain, (us, n) in top]))
    path_json = C.write_json(args, "gpu_layer_ops", {"env": env, "cases": {k: v[0] for k, v in cases.items()}})
    print(f"# wrote {path_json}")


if __name__ == "__main__":
    main()
