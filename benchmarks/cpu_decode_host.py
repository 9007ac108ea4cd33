"""Host work of one eager (dynamic-cache) decoding step on PaTH's CUDA code path, measured on a CPU: the
model takes the path it takes on CUDA (fused inputs and decoding kernels), with its Triton launches replaced
by stubs that only count themselves, so what is timed is everything around the launches. transformers'
Llama of the same shape runs its real (tiny) CPU ops beside it.

On a GPU host, eager decoding is bound by this work plus each launch's host cost: one aten op launches one
kernel (~5-10 us), one Triton launch costs 45-150 us of argument binding (docs/kernels.md, decoding). So
the table says how many dispatcher ops and Triton launches a step makes, and what the rest costs. The
models take their steps in turn (a shared CPU's speed drifts by tens of percent between runs), and "time vs
Llama" is the median of the per-step ratios; ``--baseline`` adds another checkout's PaTH to the turns.

    python benchmarks/cpu_decode_host.py [--layers 12] [--hidden 128] [--heads 2] [--contexts 64 4096] [--steps 100]
        [--baseline DIR]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import _common as C
import torch
from transformers import DynamicCache, LlamaForCausalLM

import path_lm
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


class Runner:
    """One model and its cache, prefilled with ``ids``; :meth:`step` times one eager decoding step."""

    def __init__(self, name: str, model, cache, ids, launches: dict):
        self.name, self.model, self.cache, self.launches = name, model, cache, launches
        self.mask = torch.ones(ids.shape[0], ids.shape[1], dtype=torch.long)
        self.token = ids[:, -1:]
        self.times, self.counted = [], {}
        with torch.no_grad():
            model(ids, use_cache=True, attention_mask=self.mask, **{C.CACHE_KW: cache})

    def _step(self) -> None:
        self.mask = torch.cat([self.mask, self.mask[:, :1]], 1)
        with torch.no_grad():
            self.model(self.token, use_cache=True, attention_mask=self.mask, **{C.CACHE_KW: self.cache})

    def step(self, record: bool = True) -> None:
        self.launches.clear()
        start = time.perf_counter()
        self._step()
        elapsed = time.perf_counter() - start
        if record:
            self.times.append(elapsed)
            self.counted = dict(self.launches)

    def record(self) -> dict:
        """ms per step (median), dispatcher ops and Triton launches per step."""
        with torch.profiler.profile() as prof:
            self._step()
        ops = sum(1 for event in prof.events() if event.name.startswith("aten::"))
        return dict(ms_per_step=statistics.median(self.times) * 1e3, dispatcher_ops=ops,
                    triton_launches=sum(self.counted.values()), launches=self.counted)


def load_baseline(root: Path):
    """path_lm from another checkout (``root``/path_lm), imported as ``path_lm_baseline`` beside this one."""
    spec = importlib.util.spec_from_file_location(
        "path_lm_baseline", root / "path_lm" / "__init__.py", submodule_search_locations=[str(root / "path_lm")]
    )
    if spec is None:
        raise SystemExit(f"--baseline {root}: no path_lm package there (pass a checkout of path-lm)")
    package = importlib.util.module_from_spec(spec)
    sys.modules["path_lm_baseline"] = package
    spec.loader.exec_module(package)
    return package


def stub_kernels(package, launches: dict) -> callable:
    """Replace the package's decoding kernels by counting stubs and make the decoding kernel count as usable;
    returns the function that puts everything back."""
    modules = [importlib.import_module(f"{package.__name__}.{name}") for name in ("path_triton", "path_ops", "modeling_path")]
    triton_module = modules[0]
    saved = [(triton_module, name, getattr(triton_module, name)) for name in STUBBED if hasattr(triton_module, name)]
    saved += [(module, "decode_kernel_usable", module.decode_kernel_usable) for module in modules[1:]]
    for module, name, _ in saved:
        setattr(module, name, (lambda *a: True) if name == "decode_kernel_usable" else CountingStub(launches, name))

    def restore():
        for module, name, value in saved:
            setattr(module, name, value)

    return restore


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 4096],
                        help="cached tokens before the timed steps (past path_ops.EAGER_KEYS_PER_SPLIT, PaTH's step "
                             "splits the keys and merges: a second launch)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout of path-lm (e.g. `git worktree add /tmp/base REV`), timed beside this one")
    C.add_common_args(parser, "cpu_decode_host")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.steps = 2, 3
    torch.set_num_threads(1)
    launches = {}
    packages = {"PaTH (CUDA path, Triton stubbed)": path_lm}
    if args.baseline is not None:
        packages["PaTH baseline (CUDA path, Triton stubbed)"] = load_baseline(args.baseline)
    restores = [stub_kernels(package, launches) for package in packages.values()]
    try:
        models = {}
        for name, package in packages.items():
            config = package.PaTHConfig(vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                        num_heads=args.heads, use_forget_gate=True, attn_backend="torch")
            torch.manual_seed(0)
            models[name] = (package.PaTHForCausalLM(config).eval(), lambda package=package, config=config: package.PaTHCache(config))
        llama = LlamaForCausalLM(llama_peer_config(config)).eval()
        models["Llama (CPU ops)"] = (llama, lambda: DynamicCache(config=llama.config))
        records = []
        for context in args.contexts:
            ids = torch.randint(5, 256, (1, context))
            runners = [Runner(name, model, new_cache(), ids, launches) for name, (model, new_cache) in models.items()]
            for _ in range(3):
                for runner in runners:
                    runner.step(record=False)
            for i in range(args.steps):  # the models in turn, in alternating order: the CPU's drifts hit all
                for runner in runners if i % 2 else runners[::-1]:
                    runner.step()
            llama_times = runners[-1].times
            for runner in runners:
                ratios = [t / base for t, base in zip(runner.times, llama_times)]
                records.append(dict(model=runner.name, context=context, vs_llama=statistics.median(ratios), **runner.record()))
    finally:
        for restore in restores:
            restore()
    env = C.environment(torch.device("cpu"))
    print(f"# {env['device']}; torch {env['torch']}; float32, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads, batch 1; {args.steps} steps per model, the models in turn")
    rows = [[r["model"], r["context"], f"{r['ms_per_step']:.2f}", f"{r['ms_per_step'] * 1e3 / args.layers:.0f}",
             f"{r['vs_llama']:.3f}", r["dispatcher_ops"], r["triton_launches"]] for r in records]
    print(C.markdown_table(["model", "context", "ms per step (median)", "us per layer", "time vs Llama (median of steps)",
                            "dispatcher ops per step", "Triton launches per step"], rows))
    print(f"# wrote {C.write_json(args, 'cpu_decode_host', dict(environment=env, records=records))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
