"""GPU time of a PaTH attention layer's work besides the attention op, against transformers' Llama layer.

Per head shape (hidden 1024 by default; --heads 16 is head dim 64, 8 is 128), bf16 autocast over float32
parameters, forward and forward+backward of:

- "inputs": the layer's projections through the inputs of the attention op (PaTH: q, k, v, the low-rank w,
  its short convolution, SiLU and normalization, beta and the forget gate; Llama: q, k, v and RoPE), each
  output given a random gradient;
- "layer": the whole attention layer (PaTH with path-lm's Triton op; Llama with SDPA), output projection
  included.

PaTH runs twice: with the w path as PyTorch ops, and through ``path_triton.short_conv_normalize`` (the
default on CUDA). Times are the sum of the GPU kernels of one call (torch.profiler, mean of --iters calls):
GPU time, not host time, as inside a training step that keeps the GPU busy.

    python benchmarks/gpu_layer_inputs.py [--batch 2] [--seq 4096] [--heads 16 8] [--iters 10]
"""

from __future__ import annotations

import argparse
from unittest import mock

import _common as C
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, apply_rotary_pos_emb

from path_lm import modeling_path
from path_lm.modeling_path import PaTHAttention


def gpu_us(step, iters: int) -> float:
    """Microseconds of GPU kernels per step() (torch.profiler, mean over iters calls after two warm-ups)."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / iters


def timed(call, x, iters: int) -> tuple[float, float]:
    """(forward us, forward+backward us) of call(x) under bf16 autocast, every output with a random gradient."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = call(x)
    grads = [torch.randn_like(o) for o in outs]

    def forward():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            call(x)

    def forward_backward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = call(x)
        torch.autograd.backward(outs, grads)

    return gpu_us(forward, iters), gpu_us(forward_backward, iters)


def path_inputs(layer):
    """The layer's forward up to the attention op: q, k, v, w, beta, g."""
    def stop(self, q, k, v, w, beta, g, *args, **kwargs):
        return q, k, v, w, beta, g

    def call(x):
        with mock.patch.object(PaTHAttention, "_attend", stop):
            return [t for t in layer(x)[0] if t is not None]
    return call


def llama_inputs(layer, cos, sin, B, T, H, D):
    def call(x):
        q, k, v = (proj(x).view(B, T, H, D).transpose(1, 2) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
        q, k = apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))
        return q, k, v
    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--iters", type=int, default=10)
    C.add_common_args(parser, "gpu_layer_inputs")
    args = parser.parse_args()
    device = C.pick_device(args)
    if device.type != "cuda":
        raise SystemExit("gpu_layer_inputs.py measures GPU kernels; run it on a CUDA device")
    torch.manual_seed(0)
    B, T, hidden = args.batch, args.seq, args.hidden
    x = torch.randn(B, T, hidden, device=device, requires_grad=True)
    rows = []
    for H in args.heads:
        D = hidden // H
        with torch.device(device):
            path = PaTHAttention(hidden_size=hidden, num_heads=H, use_forget_gate=True, attn_backend="triton",
                                 layer_idx=0)
            config = LlamaConfig(hidden_size=hidden, num_attention_heads=H, num_key_value_heads=H,
                                 intermediate_size=4 * hidden, attn_implementation="sdpa")
            llama = LlamaAttention(config, layer_idx=0)
            cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(T, device=device)[None].expand(B, T))
        cases = {}
        for fused in (False, True):
            usable = modeling_path.short_conv_kernel_usable
            with mock.patch.object(modeling_path, "short_conv_kernel_usable", lambda *a: fused and usable(*a)):
                name = "PaTH, w through the fused kernel" if fused else "PaTH, w as PyTorch ops"
                cases[name] = (timed(path_inputs(path), x, args.iters),
                               timed(lambda x: [path(x)[0]], x, args.iters))
        cases["Llama (SDPA, RoPE)"] = (
            timed(llama_inputs(llama, cos, sin, B, T, H, D), x, args.iters),
            timed(lambda x: [llama(x, position_embeddings=(cos, sin), attention_mask=None)[0]], x, args.iters),
        )
        llama_inputs_fb = cases["Llama (SDPA, RoPE)"][0][1]
        for name, ((in_f, in_fb), (layer_f, layer_fb)) in cases.items():
            rows.append([f"{H}x{D}", name, f"{in_f:.0f}", f"{in_fb:.0f}", f"{in_fb / llama_inputs_fb:.2f}x",
                         f"{layer_f:.0f}", f"{layer_fb:.0f}"])
    env = C.environment(device)
    print(f"# {env['device']}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; "
          f"{env['date']}")
    print(f"# batch {B} x {T}, hidden {hidden}, bf16 autocast; us of GPU kernels per call (torch.profiler)")
    print(C.markdown_table(["heads x dim", "layer", "inputs fwd us", "inputs fwd+bwd us", "inputs fwd+bwd / Llama's",
                            "layer fwd us", "layer fwd+bwd us"], rows))
    path_json = C.write_json(args, "gpu_layer_inputs", {"env": env, "rows": rows})
    print(f"# wrote {path_json}")


if __name__ == "__main__":
    main()
