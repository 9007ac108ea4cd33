"""Helpers shared by the GPU benchmarks: arguments, timing, memory, environment record, table and JSON.

Timing: kernels go through ``triton.testing.do_bench`` (median, its L2 flush and warm-up); whole-model
calls through CUDA events around each call after warm-up. On CPU (``--tiny`` checks) both fall back to
``time.perf_counter``.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPast  # noqa: E402

GIB = 2**30
# transformers 5.24 renamed the cache argument from `past_key_values` to `cache`.
CACHE_KW = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def add_common_args(parser, name: str) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and the torch backend (CPU logic check)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--json", default=None, help=f"JSON output path (default: OUT_DIR/{name}.json)")


def pick_device(args) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Device name and the versions that decide the numbers (fla read from package metadata, not imported)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        device_name = f"{name} ({total:.0f} GiB)"
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "fla": version("fla-core") or version("flash-linear-attention"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bf16_model(model_cls, config, device: torch.device):
    """(model built on `device` in bf16 eval mode, its parameter count)."""
    with torch.device(device):
        model = model_cls(config)
    model = model.to(torch.bfloat16).eval()
    return model, sum(p.numel() for p in model.parameters())


def free(device: torch.device) -> None:
    """Release cached blocks and restart the peak-memory counter (call between cases)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def failure(err: BaseException) -> str:
    """What to record for a case that raised: "OOM", or the error's first line (its traceback goes to stderr,
    and the benchmark moves on to the next case)."""
    if is_oom(err):
        return "OOM"
    traceback.print_exception(err)
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:150] if lines else ''}".replace("|", "/")


def bench_ms(fn, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of fn() (a kernel-sized call)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        fn()  # compile outside do_bench, whose first calls set its repeat count
        torch.cuda.synchronize(device)
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    return statistics.median(time_calls_ms(fn, device, repeats=3))


def graph_ms(fn, device: torch.device, calls: int = 10) -> float:
    """Median milliseconds of one fn() replayed from a CUDA graph of `calls` calls: the GPU's time without the
    host's launches (as in a compiled decoding step). On CPU: bench_ms."""
    if device.type != "cuda":
        return bench_ms(fn, device)
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return bench_ms(graph.replay, device) / calls


def time_calls_ms(fn, device: torch.device, repeats: int, stop_after_ms: float | None = None) -> list[float]:
    """Milliseconds of each of `repeats` calls (CUDA events on GPU); stops early once a call takes longer
    than stop_after_ms. The caller does the warm-up."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        if stop_after_ms is not None and times[-1] > stop_after_ms:
            break
    return times


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write); NaN off CUDA."""
    if device.type != "cuda":
        return float("nan")
    buffers = torch.empty(2, 2**30, dtype=torch.uint8, device=device)
    ms = bench_ms(lambda: buffers[1].copy_(buffers[0]), device)
    return 2 * 2**30 / (ms * 1e-3)


def host_ms(fn, device: torch.device, repeats: int = 5) -> float:
    """Median milliseconds until fn() returns, the device idle at each call: the host's share of the call
    (Python, argument checks, kernel launches), since on a GPU the kernels run on after the call returns.
    A call whose GPU time exceeds this can keep the GPU busy; one below it leaves the GPU waiting."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(times)


def cprofile_table(fn, device: torch.device, rows: int = 30) -> str:
    """cProfile's table of one call of fn() (after the caller's warm-up): the host's Python work by function,
    sorted by time spent in the function itself."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def profile_table(fn, device: torch.device, rows: int = 25) -> str:
    """torch.profiler's table of one call of fn() (after the caller's warm-up), sorted by device time:
    self CUDA time per kernel on a GPU, self CPU time per op on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def fmt(x, spec: str = ".2f", missing: str = "-") -> str:
    if x is None:
        return missing
    if isinstance(x, str):
        return x
    return format(x, spec)


def ratio(x, spec: str = ".2f") -> str:
    return f"{x:{spec}}x" if isinstance(x, float) else "-"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(args, name: str, payload: dict) -> str:
    path = args.json or os.path.join(args.out_dir, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path
