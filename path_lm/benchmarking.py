"""Speed of a PaTH model on this machine, beside transformers' Llama of the same shape (``path-lm benchmark``).

For each batch size and context length: prefill tokens/s (one forward over the prompt, no cache), decoding
ms/token and tokens/s per cache (``generate()`` with the default cache, or ``cache_implementation="static"``,
which transformers compiles on CUDA), and, with ``train=True``, training tokens/s of a forward and backward
pass (no optimizer step). Decoding time per token is ``(t(n1) - t(n0)) / (n1 - n0)`` from two greedy
``generate()`` calls of n0 and n1 new tokens after a warm-up call, so the prefill and the cache's set-up cancel
out. Prompts are random token ids: the speed does not depend on the weights.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CACHES = ("dynamic", "static")


def llama_peer_config(config, **overrides) -> LlamaConfig:
    """transformers' Llama config with the PaTH config's width, depth, heads, MLP, vocabulary and tying (RoPE
    and SDPA attention in place of PaTH's); ``overrides`` go to LlamaConfig."""
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads or config.num_heads, hidden_act=config.hidden_act,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=2**17,  # RoPE needs no table; the field only bounds nothing here
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
    )
    return LlamaConfig(**{**fields, **overrides})


def llama_peer(config, **overrides) -> LlamaForCausalLM:
    """A randomly initialized Llama of :func:`llama_peer_config`."""
    return LlamaForCausalLM(llama_peer_config(config, **overrides))


def _elapsed(fn, device: torch.device) -> float:
    """Seconds of wall time of fn(), with the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _ids(model, batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    special = {model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id} - {None}
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    for token in special:  # a random eos would stop generate() early
        ids[ids == token] = (token + 1) % vocab
    return ids.to(model.device)


@torch.no_grad()
def prefill_tokens_per_second(model, batch: int, context: int, repeats: int = 3) -> float:
    ids = _ids(model, batch, context, seed=0)
    model(ids, use_cache=False)  # warm-up
    best = min(_elapsed(lambda: model(ids, use_cache=False), model.device) for _ in range(repeats))
    return batch * context / best


@torch.no_grad()
def time_decoding(model, ids: torch.Tensor, cache: str, new_tokens: tuple[int, int] = (8, 40), repeats: int = 2) -> dict:
    """Greedy decoding after the prompts ``ids`` [batch, context]: the fastest of ``repeats`` generate() calls
    of n0 and of n1 new tokens (after a warm-up call, which compiles the static step on CUDA), and the time
    per new token (all rows together), ``(t(n1) - t(n0)) / (n1 - n0)``, in milliseconds."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    n0, n1 = new_tokens
    if not 0 < n0 < n1:
        raise ValueError(f"new_tokens must be two increasing positive counts, got {new_tokens}")
    options = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=model.config.pad_token_id)
    if cache == "static":
        options.update(cache_implementation="static", max_cache_len=ids.shape[1] + n1)

    def run(n: int):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **options)

    run(n0)
    t0 = t1 = math.inf
    for _ in range(repeats):  # interleaved, so that a drifting machine speed moves both alike
        t0 = min(t0, _elapsed(lambda: run(n0), model.device))
        t1 = min(t1, _elapsed(lambda: run(n1), model.device))
    if t1 <= t0:
        warnings.warn(f"generating {n1} tokens took no longer than {n0} ({1e3 * t1:.3f} ms vs {1e3 * t0:.3f} ms): "
                      "the time per token is below this machine's timing noise; widen new_tokens (--new-tokens)",
                      stacklevel=2)
    return {"ms_per_token": 1e3 * max(t1 - t0, 0.0) / (n1 - n0), "generate_ms_n0": 1e3 * t0, "generate_ms_n1": 1e3 * t1}


def decode_ms_per_token(model, batch: int, context: int, cache: str, new_tokens: tuple[int, int] = (8, 40),
                        repeats: int = 2) -> float:
    """:func:`time_decoding`'s ms per token on random prompts of this shape."""
    return time_decoding(model, _ids(model, batch, context, seed=1), cache, new_tokens, repeats)["ms_per_token"]


def train_tokens_per_second(model, batch: int, context: int, repeats: int = 3) -> float:
    """Forward and backward of the language-model loss (no optimizer step), tokens per second."""
    ids = _ids(model, batch, context, seed=2)
    was_training = model.training
    model.train()

    def step():
        model(ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        step()  # warm-up
        best = min(_elapsed(step, model.device) for _ in range(repeats))
    finally:
        model.train(was_training)
    return batch * context / best


def run_benchmark(models: dict, batches, contexts, caches=CACHES, train: bool = False,
                  new_tokens: tuple[int, int] = (8, 40), log=None) -> list[dict]:
    """One row per (model, batch, context, measurement); models maps a name to a model in eval mode. Rows
    of a model after the first get ``first_vs_this``: the first model's speed over this one's (tokens/s over
    tokens/s; above 1: the first model is faster)."""
    rows = []
    for batch in batches:
        for context in contexts:
            for name, model in models.items():
                measured = [("prefill", "tokens/s", prefill_tokens_per_second(model, batch, context))]
                for cache in caches:
                    ms = decode_ms_per_token(model, batch, context, cache, new_tokens)
                    measured.append((f"decode, {cache} cache", "ms/token", ms))
                if train:
                    measured.append(("train (forward + backward)", "tokens/s", train_tokens_per_second(model, batch, context)))
                for task, unit, value in measured:
                    row = dict(model=name, batch=batch, context=context, task=task, unit=unit, value=value)
                    if unit == "ms/token":
                        row["tokens_per_second"] = 1e3 * batch / value if value > 0 else float("inf")
                    rows.append(row)
                    if log:
                        log(f"{name} batch {batch} context {context} {task}: {value:,.3f} {unit}")
    first = next(iter(models))
    speed = {(r["batch"], r["context"], r["task"]): r.get("tokens_per_second", r["value"]) for r in rows if r["model"] == first}
    for row in rows:
        if row["model"] != first:
            own = row.get("tokens_per_second", row["value"])
            reference = speed[(row["batch"], row["context"], row["task"])]
            row["first_vs_this"] = reference / own
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table: one line per (batch, context, task), one column per model, and the first model's
    speed over each other's."""
    names = list(dict.fromkeys(r["model"] for r in rows))
    header = ["batch", "context", "task", *names, *[f"{names[0]} vs {n} (speed)" for n in names[1:]]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = list(dict.fromkeys((r["batch"], r["context"], r["task"], r["unit"]) for r in rows))
    for batch, context, task, unit in keys:
        cells = {r["model"]: r for r in rows if (r["batch"], r["context"], r["task"]) == (batch, context, task)}
        spec = ",.3f" if unit == "ms/token" else ",.0f"
        values = [f"{format(cells[n]['value'], spec)} {unit}" if n in cells else "-" for n in names]
        ratios = [f"{cells[n]['first_vs_this']:.2f}x" if n in cells else "-" for n in names[1:]]
        lines.append("| " + " | ".join([str(batch), str(context), task, *values, *ratios]) + " |")
    return "\n".join(lines)


__all__ = ["CACHES", "decode_ms_per_token", "format_table", "llama_peer", "llama_peer_config", "prefill_tokens_per_second",
           "run_benchmark", "time_decoding", "train_tokens_per_second"]
