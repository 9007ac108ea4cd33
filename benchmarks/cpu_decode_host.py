"""Host work of one eager (dynamic-cache) decoding step on PaTH's CUDA code path, measured on a CPU: the
model takes the path it takes on CUDA (fused inputs and decoding kernels), with its Triton launches replaced
by stubs that only count themselves, so what is timed is everything around the launches. transformers'
Llama of the same shape runs its real (tiny) CPU ops beside it.

On a GPU host, eager decoding is bound by this work plus each launch's host cost: one aten op launches one
kernel (~5-10 us), one Triton launch costs 45-150 us of argument binding (docs/kernels.md, decoding). So
the table says how many dispatcher ops and Triton launches a step makes, and what the rest costs.

    python benchmarks/cpu_decode_host.py [--layers 12] [--hidden 128] [--heads 2] [--contexts 64 4096] [--steps 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common as C
import torch
from transformers import DynamicCache, LlamaForCausalLM

from path_lm import PaTHCache, PaTHConfig, PaTHForCausalLM, modeling_path, path_ops, path_triton
from path_lm.benchmarking import llama_peer_config

STUBBED = ("_decode_inputs_kernel", "_decode_kernel", "_decode_step_kernel", "_decode_merge_kernel",
           "_decode_fold_kernel", "_decode_framed_kernel")


class CountingStub:
    """Stands for a Triton kernel: ``stub[grid](*args)`` counts the launch and does nothing."""

    def __init__(self, counts: dict, name: str):
        self.counts, self.name = counts, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1

        return launch


def step_record(model, cache, ids, steps: int, launches: dict) -> dict:
    """ms per eager decoding step (median), dispatcher ops per step, Triton launches per step."""
    mask = torch.ones(ids.shape[0], ids.shape[1], dtype=torch.long)
    token = ids[:, -1:]

    def step():
        nonlocal mask
        mask = torch.cat([mask, mask[:, :1]], 1)
        model(token, use_cache=True, attention_mask=mask, **{C.CACHE_KW: cache})

    with torch.no_grad():
        model(ids, use_cache=True, attention_mask=mask, **{C.CACHE_KW: cache})
        for _ in range(3):
            step()
        launches.clear()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3  # (the median: a shared CPU's other work lands on some steps)
        counted = {name: count // steps for name, count in launches.items()}
        with torch.profiler.profile() as prof:
            step()
    ops = sum(1 for event in prof.events() if event.name.startswith("aten::"))
    return dict(ms_per_step=ms, dispatcher_ops=ops, triton_launches=sum(counted.values()), launches=counted)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 4096],
                        help="cached tokens before the timed steps (past path_ops.EAGER_KEYS_PER_SPLIT, PaTH's step "
                             "splits the keys and merges: a second launch)")
    parser.add_argument("--steps", type=int, default=100)
    C.add_common_args(parser, "cpu_decode_host")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.steps = 2, 3
    torch.set_num_threads(1)
    launches = {}
    saved = {name: getattr(path_triton, name) for name in STUBBED}
    usable = path_ops.decode_kernel_usable, modeling_path.decode_kernel_usable
    try:
        for name in STUBBED:
            setattr(path_triton, name, CountingStub(launches, name))
        path_ops.decode_kernel_usable = modeling_path.decode_kernel_usable = lambda *a: True
        config = PaTHConfig(vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_heads=args.heads, use_forget_gate=True, attn_backend="torch")
        torch.manual_seed(0)
        path = PaTHForCausalLM(config).eval()
        llama = LlamaForCausalLM(llama_peer_config(config)).eval()
        records = []
        for context in args.contexts:
            ids = torch.randint(5, 256, (1, context))
            records += [
                dict(model="PaTH (CUDA path, Triton stubbed)", context=context,
                     **step_record(path, PaTHCache(config), ids, args.steps, launches)),
                dict(model="Llama (CPU ops)", context=context,
                     **step_record(llama, DynamicCache(config=llama.config), ids, args.steps, launches)),
            ]
    finally:
        for name, kernel in saved.items():
            setattr(path_triton, name, kernel)
        path_ops.decode_kernel_usable, modeling_path.decode_kernel_usable = usable
    env = C.environment(torch.device("cpu"))
    print(f"# {env['device']}; torch {env['torch']}; float32, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads, batch 1; {args.steps} steps")
    rows = [[r["model"], r["context"], f"{r['ms_per_step']:.2f}", f"{r['ms_per_step'] * 1e3 / args.layers:.0f}",
             r["dispatcher_ops"], r["triton_launches"]] for r in records]
    print(C.markdown_table(["model", "context", "ms per step", "us per layer", "dispatcher ops per step",
                            "Triton launches per step"], rows))
    print(f"# wrote {C.write_json(args, 'cpu_decode_host', dict(environment=env, records=records))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
