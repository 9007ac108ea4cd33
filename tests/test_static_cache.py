"""The static PaTH cache (compiled decoding) and the fused decoding kernel, on CPU.

- generate(cache_implementation="static") and a user-made PaTHStaticCache produce exactly the tokens of the
  default dynamic cache (greedy, left padding, beam search, sampling, several returned sequences), and a
  static cache continues across calls;
- a decoding step on a static cache compiles into ONE graph (fullgraph=True) that is reused at every step
  (no recompilation as the cached length grows) and gives the logits of the uncompiled step;
- the fused Triton decoding kernel (run by Triton's CPU interpreter here) against a float64 explicit formula:
  updated keys in place, output, GQA, forget gate, padding, splits over the sequence, float32 and bf16 keys,
  and keys carried lazily (frames) across several windows.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_generation import CACHE_KW, PAD, cache_of, make_model, random_ids

from path_lm import PaTHCache, PaTHStaticCache, PaTHStaticCacheLayer, cache_path, path_ops
from path_lm.path_ops import _decode_step_in_place, path_attention, path_decode_step, path_decode_step_static

# The kernel tests run on the GPU when there is one, else in Triton's CPU interpreter (conftest.py).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return make_model(seed=0)


def left_padded(batch: int, length: int, pads: list[int], seed: int):
    ids = random_ids(batch, length, seed=seed)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n] = PAD
        mask[row, :n] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------------------
# generate() with a static cache equals the dynamic cache
# ---------------------------------------------------------------------------------------------------------

GENERATE_CASES = {
    "greedy": dict(do_sample=False),
    "beam3": dict(do_sample=False, num_beams=3),
    "sample_2_sequences": dict(do_sample=True, top_k=8, num_return_sequences=2),
}


@torch.no_grad()
@pytest.mark.parametrize("case", GENERATE_CASES, ids=list(GENERATE_CASES))
def test_static_generate_equals_dynamic(model, case):
    ids, mask = left_padded(3, 11, [0, 4, 2], seed=5)
    options = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, **GENERATE_CASES[case])
    torch.manual_seed(0)
    dynamic = model.generate(ids, **options)
    torch.manual_seed(0)
    static = model.generate(ids, cache_implementation="static", **options)
    assert torch.equal(static, dynamic)


@torch.no_grad()
def test_user_static_cache_is_filled_in_place_and_continues(model):
    """A PaTHStaticCache passed to generate() is the one filled; generating on from it (a multi-token
    continuation, then single steps) equals one uninterrupted generation with a dynamic cache."""
    ids = random_ids(2, 9, seed=6)
    whole = model.generate(ids, max_new_tokens=14, min_new_tokens=14, do_sample=False)
    cache = PaTHStaticCache(model.config, max_cache_len=40)
    first = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, **{CACHE_KW: cache})
    assert cache.get_seq_length() == 9 + 6 - 1  # the last token is generated, not yet cached
    layer = cache.layers[0]
    assert isinstance(layer, PaTHStaticCacheLayer) and layer.keys.shape[2] == 40
    addresses = [t.data_ptr() for t in (layer.keys, layer.values, layer.gates, layer.conv_state)]
    rest = model.generate(first, max_new_tokens=8, min_new_tokens=8, do_sample=False, **{CACHE_KW: cache})
    assert torch.equal(rest, whole)
    assert addresses == [t.data_ptr() for t in (layer.keys, layer.values, layer.gates, layer.conv_state)]


@torch.no_grad()
def test_static_cache_forward_equals_full_forward(model):
    """Prefill, single steps, a 5-token continuation and more single steps on a static cache: every logit
    equals one full forward."""
    ids, mask = left_padded(2, 26, [3, 0], seed=7)
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = PaTHStaticCache(model.config, max_cache_len=32)
    pieces, pos = [], 0
    for n in [12, 1, 1, 1, 5, 1, 1, 1, 1, 1, 1]:
        out = model(ids[:, pos : pos + n], attention_mask=mask[:, : pos + n], use_cache=True, **{CACHE_KW: cache})
        assert cache_of(out) is cache
        pos += n
        pieces.append(out.logits)
    assert pos == ids.shape[1] and cache.get_seq_length() == pos
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], atol=1e-5, rtol=0)


@torch.no_grad()
def test_static_cache_errors_say_what_to_change(model):
    with pytest.raises(ValueError, match="max_cache_len"):
        PaTHStaticCache(model.config)
    cache = PaTHStaticCache(model.config, max_cache_len=10)
    model(random_ids(2, 8, seed=8), use_cache=True, **{CACHE_KW: cache})
    with pytest.raises(ValueError, match="larger max_cache_len"):
        model(random_ids(2, 3, seed=9), use_cache=True, **{CACHE_KW: cache})
    cache.reset()
    with pytest.raises(ValueError, match="allocated for batch 2"):
        model(random_ids(3, 4, seed=9), use_cache=True, **{CACHE_KW: cache})
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(1)


@torch.no_grad()
def test_reset_keeps_buffers_and_starts_over(model):
    ids = random_ids(1, 7, seed=10)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    cache = PaTHStaticCache(model.config, max_cache_len=16)
    model.generate(random_ids(1, 9, seed=11), max_new_tokens=5, do_sample=False, **{CACHE_KW: cache})
    keys = cache.layers[1].keys
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.filled and keys.abs().sum() == 0
    out = model.generate(ids, max_new_tokens=5, do_sample=False, **{CACHE_KW: cache})
    assert torch.equal(out, expected) and cache.layers[1].keys is keys


def _concatenated_projections(attn):
    heads = [attn.q_proj, attn.k_proj, attn.v_proj, attn.w_proj[0], attn.bt_proj, attn.g_proj]
    bias = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in heads]
    return torch.cat([m.weight for m in heads]), torch.cat(bias)


@torch.no_grad()
def test_static_cache_keeps_input_projections_in_place(model):
    """Eager calls keep each layer's concatenated input projections (weights, and biases with zeros where a
    projection has none) in the static cache, refreshed in place at every such call, so new weights are
    picked up and the address compiled steps read stays."""
    model = copy.deepcopy(model)
    cache = PaTHStaticCache(model.config, max_cache_len=24)
    out = model(random_ids(1, 9, seed=13), use_cache=True, **{CACHE_KW: cache})
    for block, layer in zip(model.model.layers, cache.layers):
        weight, bias = _concatenated_projections(block.attn)
        assert torch.equal(layer.input_weight, weight) and torch.equal(layer.input_bias, bias)
    address = cache.layers[0].input_weight.data_ptr()
    model.model.layers[0].attn.k_proj.weight.add_(0.25)
    model.model.layers[0].attn.bt_proj.bias.add_(0.5)
    model(out.logits[:, -1:].argmax(-1), use_cache=True, **{CACHE_KW: cache})
    assert cache.layers[0].input_weight.data_ptr() == address
    weight, bias = _concatenated_projections(model.model.layers[0].attn)
    assert torch.equal(cache.layers[0].input_weight, weight) and torch.equal(cache.layers[0].input_bias, bias)


@torch.no_grad()
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_caches_hold_no_views_of_the_prompts_activations(model, static):
    """Every tensor a cache layer keeps owns its memory after a prefill and decoding steps: a view (the
    short convolution's state as a slice of its input) would keep a [B, T, C] activation of the prompt alive
    per layer, a second copy of the keys' size on long prompts."""
    ids = random_ids(2, 40, seed=5)
    cache = PaTHStaticCache(model.config, max_cache_len=48) if static else PaTHCache(model.config)
    model(ids, **{CACHE_KW: cache})
    for step in range(3):
        model(ids[:, step : step + 1], **{CACHE_KW: cache})
    for i, layer in enumerate(cache.layers):
        kept = {name: t for name, t in vars(layer).items() if isinstance(t, torch.Tensor)}
        assert "conv_state" in kept
        for name, t in kept.items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), f"layer {i} {name}"


@torch.no_grad()
def test_dynamic_cache_keeps_input_projections_from_the_prompt(model):
    """A dynamic cache keeps the concatenated projections from its last call of several tokens: single-token
    steps reuse them (no concatenation per step) and give the module calls' logits; the next multi-token
    call picks up changed weights."""
    model = copy.deepcopy(model)
    ids = random_ids(2, 9, seed=14)
    out = model(ids, use_cache=True)
    cache = cache_of(out)
    kept = cache.layers[0].input_weight
    assert torch.equal(kept, _concatenated_projections(model.model.layers[0].attn)[0])
    step = out.logits[:, -1:].argmax(-1)
    logits = model(step, use_cache=True, **{CACHE_KW: cache}).logits
    assert cache.layers[0].input_weight is kept
    full = model(torch.cat([ids, step], 1)).logits[:, -1:]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    model.model.layers[0].attn.q_proj.weight.add_(0.25)
    model(random_ids(2, 3, seed=15), use_cache=True, **{CACHE_KW: cache})
    assert torch.equal(cache.layers[0].input_weight, _concatenated_projections(model.model.layers[0].attn)[0])


class _ShiftedLinear(torch.nn.Linear):
    """A Linear with an extra output shift, standing in for an adapter (LoRA) or a quantized layer."""

    def forward(self, x):
        return super().forward(x) + 0.25


@torch.no_grad()
def test_step_plan_worked_out_at_the_prompt_and_reused_by_steps(model):
    """Each layer's step plan (the concatenated projections and the decoding kernel's arguments) is worked
    out at a call of several tokens and reused, unchanged, by the single-token steps after it; a projection
    swapped for another module before a prompt is honored by the steps that follow it (module calls)."""
    model = copy.deepcopy(model)
    ids = random_ids(2, 9, seed=16)
    cache = cache_of(model(ids, use_cache=True))
    plans = [layer.step_plan for layer in cache.layers]
    assert all(plan is not None and plan.joint is not None for plan in plans)
    steps = random_ids(2, 3, seed=17)
    for i in range(3):
        model(steps[:, i : i + 1], use_cache=True, **{CACHE_KW: cache})
        assert [layer.step_plan for layer in cache.layers] == plans
    model(random_ids(2, 2, seed=18), use_cache=True, **{CACHE_KW: cache})
    assert all(layer.step_plan is not plan for layer, plan in zip(cache.layers, plans))

    attn = model.model.layers[1].attn
    shifted = _ShiftedLinear(attn.k_proj.in_features, attn.k_proj.out_features, bias=False)
    shifted.weight.copy_(attn.k_proj.weight)
    attn.k_proj = shifted
    cache = cache_of(model(ids, use_cache=True))
    assert cache.layers[1].step_plan.joint is None and cache.layers[0].step_plan.joint is not None
    logits = [model(steps[:, i : i + 1], use_cache=True, **{CACHE_KW: cache}).logits for i in range(3)]
    full = model(torch.cat([ids, steps], 1)).logits[:, -3:]
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# torch.compile: one graph for every step
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_static_decoding_step_compiles_to_one_graph_reused_every_step():
    model = make_model(seed=1)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    ids, mask = left_padded(2, 10, [2, 0], seed=12)
    compiled_cache = PaTHStaticCache(model.config, max_cache_len=24)
    eager_cache = PaTHStaticCache(model.config, max_cache_len=24)
    out = model(ids, attention_mask=mask, use_cache=True, **{CACHE_KW: compiled_cache})
    model(ids, attention_mask=mask, use_cache=True, **{CACHE_KW: eager_cache})
    step = torch.compile(model, backend=counting_backend, fullgraph=True, dynamic=False)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(6):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        compiled = step(token, attention_mask=mask[:, -1:].contiguous(), use_cache=True, **{CACHE_KW: compiled_cache}).logits
        eager = model(token, attention_mask=mask, use_cache=True, **{CACHE_KW: eager_cache}).logits
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
        token = eager.argmax(-1)
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled for 6 steps: the step recompiles as the cache grows"
    assert compiled_cache.get_seq_length() == eager_cache.get_seq_length() == 16


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 2])
def test_generate_feeds_compiled_steps_fixed_shapes(model, batch):
    """With a static cache, every decoding step generate() runs gets inputs of one shape and stride (the
    padding mask reduced to the new token's column), so the compiled step never recompiles as the sequence
    grows. Batch 1 matters: a [1, 1] view of the growing mask would keep its growing row stride."""
    ids, mask = left_padded(batch, 9, [3, 0][:batch], seed=13)
    shapes = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, PaTHStaticCache) and cache.filled:
            step_mask = kwargs["attention_mask"]
            shapes.append((tuple(kwargs["input_ids"].shape), tuple(step_mask.shape), step_mask.stride()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.generate(ids, attention_mask=mask, max_new_tokens=7, min_new_tokens=7, do_sample=False,
                       cache_implementation="static")
    finally:
        handle.remove()
    assert shapes == [((batch, 1), (batch, 1), (1, 1))] * 6


# ---------------------------------------------------------------------------------------------------------
# Fused decoding kernel (Triton; CPU interpreter here)
# ---------------------------------------------------------------------------------------------------------


def decode_reference(q, keys, values, w, beta, n, gates, key_mask, scale):
    """float64 explicit formula: keys below n get k - beta (k . w) w; softmax over slots <= n not masked."""
    q, keys, values, w, beta = (x.double() for x in (q, keys, values, w, beta))
    G = q.shape[1] // keys.shape[1]
    k = keys.clone()
    old = k[:, :, :n]
    k[:, :, :n] = old - beta[..., None, None] * (old @ w[..., None]) * w[:, :, None, :]
    kk = k[:, :, : n + 1].repeat_interleave(G, 1)
    logits = torch.einsum("bhd,bhld->bhl", q, kk)
    if gates is not None:
        logits = logits + gates.double()[:, :, n : n + 1] - gates.double()[:, :, : n + 1]
    logits = logits * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, : n + 1], -math.inf)
    probs = logits.softmax(-1)
    return torch.einsum("bhl,bhlv->bhv", probs, values[:, :, : n + 1].double().repeat_interleave(G, 1)), k


KERNEL_CASES = [
    dict(B=2, HQ=4, H=2, D=32, DV=16, L=300, n=250, gate=True, mask=True, key_dtype=torch.float32),
    dict(B=1, HQ=2, H=2, D=64, DV=64, L=100, n=99, gate=False, mask=False, key_dtype=torch.float32),
    dict(B=3, HQ=8, H=2, D=16, DV=32, L=70, n=5, gate=True, mask=True, key_dtype=torch.bfloat16),
    dict(B=1, HQ=1, H=1, D=16, DV=16, L=40, n=0, gate=True, mask=False, key_dtype=torch.float32),
    # one query head per kv head (elementwise products), tiles of 16 keys, several splits, bf16 output
    dict(B=2, HQ=3, H=3, D=32, DV=32, L=200, n=150, gate=True, mask=True, key_dtype=torch.float32,
         launch=(16, 2, 2), out=torch.bfloat16),
    dict(B=1, HQ=8, H=2, D=64, DV=64, L=90, n=64, gate=True, mask=False, key_dtype=torch.bfloat16,
         launch=(32, 4, 1), out=torch.bfloat16),
    # registers per thread capped (Triton's maxnreg, for launch sweeps)
    dict(B=2, HQ=2, H=2, D=32, DV=32, L=120, n=100, gate=True, mask=True, key_dtype=torch.float32,
         launch=(16, 2, 2, 128)),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[f"case{i}" for i in range(len(KERNEL_CASES))])
@pytest.mark.kernel
def test_decode_kernel_matches_explicit_formula(case):
    pytest.importorskip("triton")
    from path_lm.path_triton import decode_attention

    B, HQ, H, D, DV, L, n = (case[x] for x in ("B", "HQ", "H", "D", "DV", "L", "n"))
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(B, HQ, D, generator=gen).bfloat16()
    keys = torch.randn(B, H, L, D, generator=gen).to(case["key_dtype"])
    values = torch.randn(B, H, L, DV, generator=gen).bfloat16()
    w = F.normalize(torch.randn(B, H, D, generator=gen), dim=-1)
    beta = 2 * torch.rand(B, H, generator=gen)
    gates = -torch.rand(B, HQ, L, generator=gen).cumsum(-1) if case["gate"] else None
    key_mask = None
    if case["mask"]:
        key_mask = torch.rand(B, L, generator=gen) > 0.3
        key_mask[:, n] = True
    o_ref, keys_ref = decode_reference(q, keys, values, w, beta, n, gates, key_mask, D**-0.5)
    on = [x.to(KERNEL_DEVICE) if x is not None else None for x in (q, keys.clone(), values, w, beta, gates, key_mask)]
    q, updated, values, w, beta, gates, key_mask = on
    position = torch.tensor(n, device=KERNEL_DEVICE)
    out = case.get("out", torch.float32)
    o = decode_attention(
        q, updated, values, w, beta, position, gates=gates, key_mask=key_mask, scale=D**-0.5,
        out_dtype=out, launch=case.get("launch"),
    )
    assert o.dtype == out
    o, updated = o.cpu(), updated.cpu()
    if out == torch.float32:
        torch.testing.assert_close(o.double(), o_ref, atol=2e-6, rtol=1e-5)
    else:  # rounded once, at the end: within one bf16 step (2^-7 relative; Triton's interpreter truncates)
        torch.testing.assert_close(o.double(), o_ref, atol=1e-6, rtol=2**-7)
    if case["key_dtype"] == torch.float32:
        torch.testing.assert_close(updated[:, :, :n].double(), keys_ref[:, :, :n], atol=2e-6, rtol=1e-6)
    else:  # stored rounded to bf16: within one rounding of the exact update
        torch.testing.assert_close(updated[:, :, :n].double(), keys_ref[:, :, :n].bfloat16().double(), atol=0.02, rtol=0.01)
    assert torch.equal(updated[:, :, n:], keys[:, :, n:]), "the new key and the slots after it must stay untouched"


@torch.no_grad()
@pytest.mark.parametrize("key_dtype", ["float32", "mixed"])
@pytest.mark.parametrize("long_cache", [True, False], ids=["frames", "short_cache"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic_step", "static_step"])
@pytest.mark.kernel
def test_decode_steps_with_kernel_equal_torch_ops(static, long_cache, key_dtype, monkeypatch):
    """The decoding steps of both caches give the same outputs and cache with the kernel and with torch
    ops, over 40 steps that cross a window of lazily carried keys (cache.FRAME_WINDOW), and a continuation
    by several tokens afterwards (which carries the framed keys first). A cache of at most
    FRAMES_MIN_KEYS keys keeps no frames (every key rewritten per step). On the dynamic cache the kernel
    writes the new slot itself, its buffers grow mid-way, and the step runs as one program per head (short
    cache) or as splits and a merge (long cache). cache_key_dtype="mixed" (float32 model here, so no
    rounding): the kernel's cache keeps frames at every size and the window's keys in its ring, filled from
    the prompt and again after the continuation."""
    pytest.importorskip("triton")
    monkeypatch.setattr(cache_path, "FRAMES_MIN_KEYS", 0 if long_cache else 10**6)
    monkeypatch.setattr(cache_path, "GROWTH_BLOCK", 16)  # the dynamic cache grows mid-way
    # eager steps of the dynamic cache: one program per head and no merge, or (long_cache) several splits
    monkeypatch.setattr(path_ops, "EAGER_KEYS_PER_SPLIT", 16 if long_cache else 8192)
    B, HQ, H, D, L, steps = 2, 4, 2, 16, 37, 40
    PADDED_STEP = 4
    gen = torch.Generator().manual_seed(3)
    step_inputs = []
    for _ in range(steps):
        step_inputs.append((
            torch.randn(B, 1, HQ, D, generator=gen), torch.randn(B, 1, H, D, generator=gen),
            torch.randn(B, 1, H, D, generator=gen), F.normalize(torch.randn(B, 1, H, D, generator=gen), dim=-1),
            2 * torch.rand(B, 1, H, generator=gen), F.logsigmoid(torch.randn(B, 1, HQ, generator=gen)),
        ))
    prompt_keys, prompt_values = torch.randn(B, L, H, D, generator=gen), torch.randn(B, L, H, D, generator=gen)
    prompt_gates = -torch.rand(B, L, HQ, generator=gen).cumsum(1)
    more = [torch.randn(B, 3, *shape, generator=gen) for shape in ((HQ, D), (H, D), (H, D), (H, D))]
    more_w = F.normalize(more[3], dim=-1)
    more_beta, more_g = 2 * torch.rand(B, 3, H, generator=gen), F.logsigmoid(torch.randn(B, 3, HQ, generator=gen))
    on = lambda x: x.to(KERNEL_DEVICE)  # noqa: E731
    results = []
    for use_kernel in (False, True):
        layer = (PaTHStaticCacheLayer(96, key_dtype) if static
                 else PaTHCache(num_hidden_layers=1, cache_key_dtype=key_dtype).layers[0])
        mask = torch.ones(B, L, dtype=torch.bool, device=KERNEL_DEVICE)
        mask[0, :5] = False
        layer.append(on(prompt_keys), on(prompt_values), on(prompt_gates), mask if static else None,
                     decoding_kernel=use_kernel)
        ring = key_dtype == "mixed" and use_kernel
        assert (layer.key_ring is not None) == ring
        outputs = []
        for step, (q, k, v, w, beta, g) in enumerate(step_inputs):
            q, k, v, w, beta, g = (on(x) for x in (q, k, v, w, beta, g))
            token_mask = torch.ones(B, 1, dtype=torch.bool, device=KERNEL_DEVICE)
            token_mask[1] = step != PADDED_STEP  # row 1 gets one padding token mid-way
            switched = ring and step % 7 == 3  # a PyTorch step between kernel steps refills the ring
            if static:
                outputs.append(path_decode_step_static(q, k, v, w, beta, g, layer, token_mask=token_mask,
                                                       use_kernel=use_kernel and not switched))
            elif switched:
                mask = torch.cat([mask, token_mask], 1)
                outputs.append(path_attention(q, k, v, w, beta, g, key_mask=mask, cache=layer, backend="torch"))
            elif use_kernel:  # the kernel writes the new slot (and grows the buffers past their first block)
                mask = torch.cat([mask, token_mask], 1)
                outputs.append(_decode_step_in_place(q, k, v, w, beta, g, layer, key_mask=mask))
            else:
                gate = layer.cumulative_gate(g)
                keys, values, gates = layer.append(k, v, gate)
                mask = torch.cat([mask, token_mask], 1)
                outputs.append(path_decode_step(q, keys, values, w, beta, gate=gates, key_mask=mask))
        if use_kernel or not long_cache:  # (a static cache on CUDA allocates them with its buffers)
            assert (layer.frames is not None) == (use_kernel and (long_cache or ring)), "frames only on long caches"
        carried = layer.keys_view().clone()
        # continuation by three tokens through path_attention (PyTorch ops), which reads the carried keys

        full_mask = torch.ones(B, L + steps + 3, dtype=torch.bool, device=KERNEL_DEVICE)
        full_mask[0, :5] = False
        full_mask[1, L + PADDED_STEP] = False
        stored = (layer.values_view().clone(), layer.gates_view().clone())
        if static:
            assert torch.equal(layer.key_mask[:, : L + steps], full_mask[:, : L + steps])
        o_more = path_attention(on(more[0]), on(more[1]), on(more[2]), on(more_w), on(more_beta), on(more_g),
                                key_mask=full_mask, cache=layer, backend="torch")
        if ring:  # refilled from the continuation: the next window's keys, as the cache holds them
            n = layer.get_seq_length()
            first = layer.frame_window * ((n - 1) // layer.frame_window)
            in_ring = layer.key_ring[:, :, torch.arange(first, n) % layer.key_ring.shape[2]]
            torch.testing.assert_close(in_ring, layer.keys_view()[:, :, first:n].float())
        results.append((torch.cat(outputs, 1), carried, *stored, layer.keys_view().clone(), o_more, layer.get_seq_length()))
    names = ("outputs", "carried keys", "values", "gates", "keys after continuation", "continuation")
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    assert results[0][-1] == results[1][-1] == L + steps + 3


STEP_OPTIONS = {
    "all_options": dict(use_forget_gate=True, use_qk_norm=True, conv_bias=True, conv_size=4, beta_max=1.5),
    "plain": dict(use_forget_gate=False, use_qk_norm=False, use_w_shortconv=False, use_low_rank_w=False),
}


@torch.no_grad()
@pytest.mark.parametrize("kind", ["dynamic", "dynamic_splits", "static"])
@pytest.mark.parametrize("options", list(STEP_OPTIONS), ids=list(STEP_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_fused_step_inputs_equal_pytorch_ops(dtype, options, kind, monkeypatch):
    """A decoding step's inputs from one projection product and path_triton.decode_inputs (short convolution,
    SiLU, qk-norm, w normalization, beta, gate, padding) equal the layer's PyTorch ops: float32 to rounding,
    bf16 to one bf16 step (the kernel rounds where torch's bf16 ops do), over steps that update the
    convolution's state (a static cache also with a padded step); outputs and caches follow. On a dynamic
    cache the decoding kernel computes the inputs itself, over several splits of the keys in
    "dynamic_splits" (each split computes them; the next convolution state is a new tensor the cache keeps)."""
    pytest.importorskip("triton")
    if dtype == torch.bfloat16 and KERNEL_DEVICE == "cpu":
        pytest.skip("Triton's CPU interpreter does not round to bf16 as the GPU does")
    from path_lm import modeling_path

    torch.manual_seed(0)
    attn = modeling_path.PaTHAttention(64, 4, 2, layer_idx=0, attn_backend="torch", **STEP_OPTIONS[options])
    for p in attn.parameters():
        p.data.normal_(0, 0.3)
    attn = attn.to(KERNEL_DEVICE, dtype)
    gen = torch.Generator().manual_seed(1)
    static = kind == "static"
    if kind == "dynamic_splits":  # 3 splits of 32 keys (the kernel's tile) over the 70 to 73 keys
        monkeypatch.setattr(path_ops, "EAGER_KEYS_PER_SPLIT", 32)
    prompt = torch.randn(3, 70 if kind == "dynamic_splits" else 9, 64, generator=gen).to(KERNEL_DEVICE, dtype)
    steps = [torch.randn(3, 1, 64, generator=gen).to(KERNEL_DEVICE, dtype) for _ in range(4)]
    inputs, fused_calls = [], []
    attend = modeling_path.path_attention
    monkeypatch.setattr(modeling_path, "path_attention", lambda *a, **k: inputs[-1].append(a[:6]) or attend(*a, **k))
    kernel = modeling_path.decode_inputs
    monkeypatch.setattr(modeling_path, "decode_inputs", lambda *a, **k: fused_calls.append(1) or kernel(*a, **k))
    results = []
    for fused in (False, True):
        monkeypatch.setattr(modeling_path, "decode_kernel_usable", lambda *a: fused)
        cache = PaTHStaticCache(num_hidden_layers=1, max_cache_len=16) if static else PaTHCache(num_hidden_layers=1)
        inputs.append([])
        mask = torch.ones(3, prompt.shape[1], dtype=torch.long, device=KERNEL_DEVICE)
        outputs = [attn(prompt, attention_mask=mask, cache=cache)[0]]
        for i, x in enumerate(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            mask[1, -1] = int(not (static and i == 2))  # row 1's third new token is padding (static cache)
            outputs.append(attn(x, attention_mask=mask, cache=cache)[0])
        layer = cache.layers[0]
        state = layer.conv_state if layer.conv_state is not None else torch.zeros(1)
        results.append((torch.cat(outputs, 1), layer.keys_view(), layer.values_view(), state))
    assert len(fused_calls) == len(steps), "every step takes the fused inputs"
    step_inputs = [x for x in zip(*inputs) if x[0][0].shape[1] == 1]
    assert len(step_inputs) == len(steps)
    for reference, fused in step_inputs:
        for name, a, b in zip(("q", "k", "v", "w", "beta", "g"), reference, fused):
            if a is None:
                assert b is None, name
            elif dtype == torch.float32:
                torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5, msg=name)
            else:
                assert b.dtype == a.dtype, name
                if a.dtype == torch.bfloat16:  # one bf16 step apart at most, equal almost everywhere
                    ulp = torch.finfo(torch.bfloat16).eps * a.float().abs().clamp(min=2**-126)
                    assert ((b.float() - a.float()).abs() <= ulp).all(), name
                    assert (a == b).float().mean() > 0.95, name
                else:  # float32 from bf16 intermediates: w from one bf16 step of the convolution's output
                    torch.testing.assert_close(b, a, atol=1e-2, rtol=1e-2, msg=name)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for name, a, b in zip(("outputs", "keys", "values", "convolution state"), *results):
        torch.testing.assert_close(b.float(), a.float(), **tolerance, msg=name)


@pytest.mark.parametrize("slot_on_device", [False, True], ids=["int_slot", "device_slot"])
@pytest.mark.kernel
def test_decode_kernel_casts_the_new_token_to_the_buffers(slot_on_device):
    """The kernel writes the new token's key and value (given in float32) in the buffers' dtypes, and scores
    and weights the new value as stored (rounded), as the PyTorch step reads it back from the cache."""
    pytest.importorskip("triton")
    from path_lm.path_triton import decode_attention

    B, HQ, H, D, L, n = 2, 2, 2, 16, 40, 30
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(B, HQ, D, generator=gen)
    keys = torch.randn(B, H, L, D, generator=gen)
    values = torch.randn(B, H, L, D, generator=gen).half()
    w = F.normalize(torch.randn(B, H, D, generator=gen), dim=-1)
    beta = 2 * torch.rand(B, H, generator=gen)
    k_new, v_new = torch.randn(B, H, D, generator=gen), torch.randn(B, H, D, generator=gen)
    expected_keys, expected_values = keys.clone(), values.clone()
    expected_keys[:, :, n], expected_values[:, :, n] = k_new, v_new.half()
    o_ref, keys_ref = decode_reference(q, expected_keys, expected_values, w, beta, n, None, None, D**-0.5)
    on = [x.to(KERNEL_DEVICE) for x in (q, keys, values, w, beta, k_new, v_new)]
    q, keys, values, w, beta, k_new, v_new = on
    slot = torch.tensor(n, device=KERNEL_DEVICE) if slot_on_device else n
    o = decode_attention(q, keys, values, w, beta, slot, scale=D**-0.5, new_token=(k_new, v_new, None, None),
                         launch=(16, 2, 2))
    assert values.dtype == torch.float16
    assert torch.equal(values[:, :, n].cpu(), v_new.half().cpu()) and torch.equal(keys[:, :, n].cpu(), k_new.cpu())
    torch.testing.assert_close(o.cpu().double(), o_ref, atol=2e-6, rtol=1e-5)


@pytest.mark.kernel
def test_decode_inputs_refuses_projections_of_the_wrong_width():
    """decode_inputs reads the projections by column offsets: a width that does not add up, or a low-rank
    factor of the wrong shape, is refused with what was expected instead of read at the wrong columns."""
    pytest.importorskip("triton")
    from path_lm.path_triton import decode_inputs

    x = torch.zeros(2, 4 * 8 + 2 * 2 * 8 + 2 * 8 + 2 + 4, device=KERNEL_DEVICE)  # q, k, v, w, beta, gate
    decode_inputs(x, heads=4, kv_heads=2, head_dim=8, has_gate=True)
    with pytest.raises(ValueError, match="columns where the projections need 86"):
        decode_inputs(x[:, :-1], heads=4, kv_heads=2, head_dim=8, has_gate=True)
    with pytest.raises(ValueError, match="columns where the projections need 82"):
        decode_inputs(x, heads=4, kv_heads=2, head_dim=8, has_gate=False)
    low = x[:, : 4 * 8 + 2 * 2 * 8 + 4 + 2 + 4].contiguous()  # w's bottleneck of rank 4
    decode_inputs(low, heads=4, kv_heads=2, head_dim=8, has_gate=True, w_up=torch.zeros(16, 4, device=KERNEL_DEVICE))
    with pytest.raises(ValueError, match=r"w_up must be a contiguous \[16, R\] matrix"):
        decode_inputs(low, heads=4, kv_heads=2, head_dim=8, has_gate=True, w_up=torch.zeros(4, 16, device=KERNEL_DEVICE).t())


@torch.no_grad()
@pytest.mark.parametrize(
    "options, frames, splits",
    [(options, frames, 1) for options in ("all_options", "plain") for frames in (False, True)]
    + [("all_options", False, 3), ("all_options", True, 3)],
    ids=lambda value: {False: "every_key", True: "frames_ring"}.get(value, str(value)) if isinstance(value, bool) else str(value),
)
@pytest.mark.kernel
def test_decode_step_kernel_equals_inputs_then_attention(options, frames, splits, monkeypatch):
    """decode_attention(inputs=decode_inputs(..., launch=False)) computes the step's inputs inside its
    decoding kernel (_decode_step_kernel: one launch with one split, with three splits every split computes
    them and writes the next convolution state to a new tensor, then the merge) and leaves everything as the
    separate launches do (decode_inputs, then decode_attention): output, keys, values, gates, padding,
    convolution state, frames and ring, and the inputs themselves. Over 14 steps with GQA, every input
    option (low-rank w, convolution with bias, qk-norm, gate, beta clamp, a padded new token) or none; with
    frames the steps cross a fold, where the inputs kernel launches first (the fold reads w and beta)."""
    pytest.importorskip("triton")
    from path_lm import path_triton

    B, HQ, H, D, R, K, P, steps, window = 2, 4, 2, 16, 8, 4, 21, 14, 16
    L = P + steps
    full = options == "all_options"
    gen = torch.Generator().manual_seed(11)
    on = lambda x: x.to(KERNEL_DEVICE)  # noqa: E731
    width = (HQ + 2 * H) * D + (R if full else H * D) + H + (HQ if full else 0)
    weights = dict(
        heads=HQ, kv_heads=H, head_dim=D, has_gate=full,
        w_up=on(torch.randn(H * D, R, generator=gen) * 0.3) if full else None,
        conv_weight=on(torch.randn(H * D, K, generator=gen) * 0.5) if full else None,
        conv_bias=on(torch.randn(H * D, generator=gen) * 0.1) if full else None,
        q_norm=on(1 + 0.1 * torch.randn(D, generator=gen)) if full else None,
        k_norm=on(1 + 0.1 * torch.randn(D, generator=gen)) if full else None,
        beta_max=1.5 if full else None,
    )
    state = dict(
        keys=torch.randn(B, H, L, D, generator=gen), values=torch.randn(B, H, L, D, generator=gen),
        gates=-torch.rand(B, HQ, L, generator=gen).cumsum(-1), key_mask=torch.rand(B, L, generator=gen) > 0.1,
        conv_state=torch.randn(B, K - 1, H * D, generator=gen) if full else None,
        frames=torch.eye(D).expand(B, 2, H, D, D).contiguous() if frames else None,
        ring=torch.zeros(B, H, 2 * window, D) if frames else None,
    )
    state = {name: on(x) if x is not None else None for name, x in state.items()}
    if frames:  # the window of the first step, exact in the ring
        first = window * ((P - 1) // window)
        state["ring"][:, :, torch.arange(first, P) % (2 * window)] = state["keys"][:, :, first:P]
    xs = [on(torch.randn(B, width, generator=gen)) for _ in range(steps)]
    launched = {"_decode_step_kernel": [], "_decode_inputs_kernel": []}

    class Counting:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(path_triton, name)

        def __getitem__(self, grid):
            launched[self.name].append(grid)
            return self.kernel[grid]

    for name in launched:
        monkeypatch.setattr(path_triton, name, Counting(name))
    runs = []
    for hold in (False, True):
        st = {name: x.clone() if x is not None else None for name, x in state.items()}
        outputs, inputs = [], []
        for i, (n, x) in enumerate(zip(range(P, L), xs)):
            token_mask = on(torch.tensor([True, i != 5])) if full else None
            *step, held = path_triton.decode_inputs(x, conv_state=st["conv_state"], token_mask=token_mask,
                                                   launch=False, **weights) if hold else (
                *path_triton.decode_inputs(x, conv_state=st["conv_state"], token_mask=token_mask, **weights), None)
            q, k, v, w, beta, g = step
            o = path_triton.decode_attention(
                q, st["keys"], st["values"], w, beta, n, gates=st["gates"] if full else None, key_mask=st["key_mask"],
                frames=st["frames"], window=window, scale=D**-0.5, new_token=(k, v, g, None), max_splits=splits,
                ring=st["ring"], inputs=held, launch=(16, 2, 4),
            )
            if held is not None:
                fold = frames and n % window == 0 and n > window
                assert (held.conv_state is st["conv_state"]) == (splits == 1 or not full or fold)
                st["conv_state"] = held.conv_state
            outputs.append(o)
            inputs.append([t.clone() for t in step if t is not None])
        runs.append((outputs, inputs, st))
    folds = sum(1 for n in range(P, L) if frames and n % window == 0 and n > window)
    fused = launched["_decode_step_kernel"]
    assert len(fused) == steps - folds, "every step but the fold steps computes its inputs in the decoding kernel"
    assert len(launched["_decode_inputs_kernel"]) == steps + folds, "the inputs kernel: every separate step, the folds"
    assert {grid[0] for grid in fused} == {splits}
    (o_two, in_two, st_two), (o_one, in_one, st_one) = runs
    close = (lambda a, b, msg: torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=msg)) if KERNEL_DEVICE != "cpu" else (
        lambda a, b, msg: torch.testing.assert_close(b, a, atol=0, rtol=0, msg=msg))
    for i in range(steps):
        close(o_two[i], o_one[i], f"output of step {i}")
        for j, (a, b) in enumerate(zip(in_two[i], in_one[i])):
            close(a, b, f"input {j} of step {i}")
    for name, a in st_two.items():
        if a is not None:
            close(a, st_one[name], name)


@torch.no_grad()
@pytest.mark.kernel
def test_held_inputs_with_the_slot_on_the_device_launch_first(monkeypatch):
    """The decoding kernel computes held inputs itself only with the slot given on the host: with the slot
    as a device tensor (a compiled step's) the inputs kernel runs first and the step equals the one with
    the inputs launched by decode_inputs itself."""
    pytest.importorskip("triton")
    from path_lm import path_triton

    B, HQ, H, D, P = 2, 4, 2, 16, 21
    gen = torch.Generator().manual_seed(12)
    on = lambda x: x.to(KERNEL_DEVICE)  # noqa: E731
    weights = dict(heads=HQ, kv_heads=H, head_dim=D, has_gate=False)
    x = on(torch.randn(B, (HQ + 3 * H) * D + H, generator=gen))
    keys, values = on(torch.randn(B, H, P + 4, D, generator=gen)), on(torch.randn(B, H, P + 4, D, generator=gen))
    launched = []
    kernel = path_triton._decode_step_kernel

    class Counting:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(path_triton, "_decode_step_kernel", Counting())
    outputs = []
    for hold in (False, True):
        k_buf, v_buf = keys.clone(), values.clone()
        q, k, v, w, beta, g, *held = path_triton.decode_inputs(x, launch=not hold, **weights)
        o = path_triton.decode_attention(q, k_buf, v_buf, w, beta, on(torch.tensor(P)), scale=D**-0.5,
                                         new_token=(k, v, None, None), inputs=held[0] if held else None)
        assert not held or not held[0].pending
        outputs.append((o, k_buf, v_buf))
    assert launched == []
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "fp16"])
@pytest.mark.kernel
def test_small_linear_matches_float64_products(rows, gated, dtype):
    """path_triton.small_linear (compiled decoding steps' linear layers) against float64 products rounded where
    PyTorch's ops round: each product (with its bias) once, then the SiLU, then the gated product. A width
    past one tile of the reduction (2100 > 2048) and a column count that is no multiple of the column block.
    fp16 stands for the half dtypes (the CPU interpreter does not round bf16 as the GPU does)."""
    pytest.importorskip("triton")
    from path_lm.path_triton import small_linear

    gen = torch.Generator().manual_seed(rows)
    for K, N in ((48, 37), (2100, 21)):
        x = torch.randn(rows, K, generator=gen)
        w, u, b = torch.randn(N, K, generator=gen) / K**0.5, torch.randn(N, K, generator=gen) / K**0.5, torch.randn(N, generator=gen)
        x, w, u, b = (t.to(KERNEL_DEVICE, dtype) for t in (x, w, u, b))

        def rounded(t):
            return t.to(dtype).double()

        if gated:
            gate, up = rounded(x.double() @ w.double().T), rounded(x.double() @ u.double().T)
            expected = rounded(rounded(gate * torch.sigmoid(gate)) * up)
            got = small_linear(x, w, up=u)
        else:
            expected = rounded(x.double() @ w.double().T + b.double())
            got = small_linear(x, w, b)
        assert got.shape == (rows, N) and got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
        else:  # equal almost everywhere; a product one half-precision step off (the float32 sums' order)
            # moves the gated result through three more roundings
            ulp = torch.finfo(dtype).eps * expected.abs().clamp(min=2**-14)
            assert ((got.double() - expected).abs() <= (4 if gated else 1.01) * ulp).all()
            assert (got.double() == expected).float().mean() > 0.9
    x3 = torch.randn(2, 1, 48, generator=gen).to(KERNEL_DEVICE, dtype)
    assert small_linear(x3, w[:, :48].contiguous()).shape == (2, 1, N)
    with pytest.raises(ValueError, match="weight contiguous"):
        small_linear(x3, w[:, :48])


@torch.no_grad()
def test_gated_mlp_through_small_linear_equals_module_calls(monkeypatch):
    """With path_ops.small_linear_usable true (as in a compiled CUDA step of few rows, here up to 8), a model's
    decoding steps run the gated MLP's products, SiLU and product through small_linear and give the module
    calls' logits; the prefill's 12 rows keep the module calls."""
    pytest.importorskip("triton")
    from path_lm import modeling_path

    model = make_model(use_forget_gate=True).to(KERNEL_DEVICE).eval()
    ids = random_ids(2, 6, seed=3).to(KERNEL_DEVICE)
    calls = []
    kernel = modeling_path.small_linear
    monkeypatch.setattr(modeling_path, "small_linear", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    logits = []
    for small in (False, True):
        monkeypatch.setattr(modeling_path, "small_linear_usable", lambda x, *w: small and x.numel() <= 8 * x.shape[-1])
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        logits.append(torch.stack(out.logits))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    steps = 3  # the first new token comes from the prefill
    assert len(calls) == model.config.num_hidden_layers * steps, "one launch per layer and step"
    assert all(shape[:-1].numel() == 2 for shape in calls)


def test_full_static_cache_steps_refused_or_nan():
    """A static cache with no free slot: an uncompiled step raises and says what to change; the kernel (as a
    compiled step runs it, with no host check) gives NaN and leaves the position at the end."""
    pytest.importorskip("triton")
    from path_lm.path_triton import decode_attention

    B, H, D, L = 1, 2, 16, 8
    layer = PaTHStaticCacheLayer(L)
    on = lambda x: x.to(KERNEL_DEVICE)  # noqa: E731
    layer.append(on(torch.randn(B, L, H, D)), on(torch.randn(B, L, H, D)), on(-torch.rand(B, L, H).cumsum(1)))
    step = [on(torch.randn(B, 1, H, D)) for _ in range(4)]
    w = F.normalize(step[3], dim=-1)
    beta, g = on(torch.rand(B, 1, H)), on(-torch.rand(B, 1, H))
    with pytest.raises(ValueError, match="max_cache_len"):
        path_decode_step_static(step[0], step[1], step[2], w, beta, g, layer)
    o = decode_attention(step[0][:, 0], layer.keys, layer.values, w[:, 0], beta[:, 0], layer.position,
                         gates=layer.gates, key_mask=layer.key_mask, scale=0.25,
                         new_token=(step[1][:, 0], step[2][:, 0], g[:, 0], None))
    assert torch.isnan(o).all() and int(layer.position) == L
    with pytest.raises(ValueError, match="past the key buffer"):  # a host-side slot is checked on the host
        decode_attention(step[0][:, 0], layer.keys, layer.values, w[:, 0], beta[:, 0], L, gates=layer.gates,
                         scale=0.25, new_token=(step[1][:, 0], step[2][:, 0], g[:, 0], None))
    # The last free slot is no overflow, for every head: the merge advances the slot after the step, and no
    # program may read it advanced (the interpreter runs programs in order, so program 0 writes first).
    last = PaTHStaticCacheLayer(L)
    last.append(on(torch.randn(B, L - 1, H, D)), on(torch.randn(B, L - 1, H, D)), on(-torch.rand(B, L - 1, H).cumsum(1)))
    o = decode_attention(step[0][:, 0], last.keys, last.values, w[:, 0], beta[:, 0], last.position,
                         gates=last.gates, key_mask=last.key_mask, scale=0.25,
                         new_token=(step[1][:, 0], step[2][:, 0], g[:, 0], None))
    assert torch.isfinite(o).all() and int(last.position) == L


@pytest.mark.parametrize("HQ", [2, 4], ids=["one_query_head", "gqa"])
@pytest.mark.parametrize("slot_on_device", [True, False], ids=["slot_on_device", "slot_on_host"])
@pytest.mark.kernel
def test_decode_kernel_with_frames_matches_explicit_recurrence(HQ, slot_on_device):
    """Decoding steps with lazily carried keys (frames) over three windows of 16: every step's output and,
    at the end, the keys carried by the test's own formula, against float64 keys rewritten at every step.
    With the slot known on the host (eager steps) the fold kernel is launched only on fold steps."""
    pytest.importorskip("triton")
    from path_lm.path_triton import decode_attention

    B, H, D, DV, P, steps, window = 2, 2, 32, 16, 21, 40, 16
    L = P + steps
    gen = torch.Generator().manual_seed(HQ)
    exact = torch.zeros(B, H, L, D, dtype=torch.float64)
    exact[:, :, :P] = torch.randn(B, H, P, D, generator=gen, dtype=torch.float64)
    values = torch.randn(B, H, L, DV, generator=gen).bfloat16()
    gates = -torch.rand(B, HQ, L, generator=gen).cumsum(-1)
    key_mask = torch.rand(B, L, generator=gen) > 0.2
    key_mask[:, P:] = True
    keys = exact.float().to(KERNEL_DEVICE)
    frames = torch.eye(D).expand(B, 2, H, D, D).contiguous().to(KERNEL_DEVICE)
    on = lambda x: x.to(KERNEL_DEVICE)  # noqa: E731
    for n in range(P, L):
        q = torch.randn(B, HQ, D, generator=gen).bfloat16()
        k_new = torch.randn(B, H, D, generator=gen, dtype=torch.float64)
        w = F.normalize(torch.randn(B, H, D, generator=gen), dim=-1)
        beta = 2 * torch.rand(B, H, generator=gen)
        exact[:, :, n] = k_new
        keys[:, :, n] = on(k_new.float())
        o_ref, exact = decode_reference(q, exact, values, w, beta, n, gates, key_mask, D**-0.5)
        o = decode_attention(
            on(q), keys, on(values), on(w), on(beta), torch.tensor(n, device=KERNEL_DEVICE) if slot_on_device else n, gates=on(gates),
            key_mask=on(key_mask), frames=frames, window=window, scale=D**-0.5, launch=(16, 2, 2),
        )
        torch.testing.assert_close(o.cpu().double(), o_ref, atol=1e-5, rtol=1e-4, msg=f"step at slot {n}")
        if n % window == 0:  # every key was carried to position n and the frames are the identity
            torch.testing.assert_close(keys[:, :, :n].cpu().double(), exact[:, :, :n], atol=1e-5, rtol=1e-5)
    # Keys below window * floor((L - 1) / window) are in an older frame; frames[:, L % 2] carries them.
    framed = window * ((L - 1) // window)
    assert 0 < framed < L - 1
    carried = keys.cpu().double().clone()
    carried[:, :, :framed] = carried[:, :, :framed] @ frames[:, L % 2].cpu().double().transpose(-1, -2)
    torch.testing.assert_close(carried[:, :, :L], exact, atol=1e-5, rtol=1e-5)
    stale = keys[:, :, :framed].cpu().double()
    assert (stale - exact[:, :, :framed]).abs().max() > 0.1, "framed keys should not be rewritten between folds"


@pytest.mark.parametrize("HQ, slot_on_device", [(2, True), (4, False)],
                         ids=["one_query_head-slot_on_device", "gqa-slot_on_host"])
@pytest.mark.kernel
def test_decode_kernel_ring_keeps_the_window_exact(HQ, slot_on_device):
    """cache_key_dtype="mixed": bf16 keys with frames and a float32 ring of the window's keys, the kernel
    writing the new slot, over three windows of 16 against float64 keys rewritten at every step. The ring
    holds the window's keys to float32 accuracy at every step, the bf16 buffer their rounded copies; framed
    keys are rounded once per fold, so after three folds every key is within a few bf16 roundings of the
    exact one, several times closer than bf16 keys rewritten at every step (run beside it)."""
    pytest.importorskip("triton")
    from path_lm.path_triton import decode_attention

    B, H, D, DV, P, steps, window = 2, 2, 32, 16, 21, 40, 16
    L = P + steps
    gen = torch.Generator().manual_seed(HQ + 10)
    exact = torch.zeros(B, H, L, D, dtype=torch.float64)
    exact[:, :, :P] = torch.randn(B, H, P, D, generator=gen, dtype=torch.float64)
    values = torch.randn(B, H, L, DV, generator=gen).bfloat16()
    on = lambda x: x.to(KERNEL_DEVICE)  # noqa: E731
    keys = on(exact.bfloat16())  # the prompt's keys, rounded once
    every_step = keys.clone()  # bf16 keys rewritten at every step, no frames: the comparison
    frames = on(torch.eye(D).expand(B, 2, H, D, D).contiguous())
    ring = on(torch.zeros(B, H, 2 * window, D))
    first = window * ((P - 1) // window)  # the window of the first step, [first, P), exact in the ring
    ring[:, :, torch.arange(first, P) % (2 * window)] = on(exact[:, :, first:P].float())
    for n in range(P, L):
        q = torch.randn(B, HQ, D, generator=gen).bfloat16()
        k_new = torch.randn(B, H, D, generator=gen).bfloat16()
        w = F.normalize(torch.randn(B, H, D, generator=gen), dim=-1)
        beta = 2 * torch.rand(B, H, generator=gen)
        exact[:, :, n] = k_new.double()
        o_ref, exact = decode_reference(q, exact, values, w, beta, n, None, None, D**-0.5)
        o = decode_attention(
            on(q), keys, on(values), on(w), on(beta), torch.tensor(n, device=KERNEL_DEVICE) if slot_on_device else n,
            frames=frames, window=window, scale=D**-0.5, launch=(16, 2, 2), ring=ring,
            new_token=(on(k_new), on(values[:, :, n]), None, None),
        )
        decode_attention(on(q), every_step, on(values), on(w), on(beta), n, scale=D**-0.5, launch=(16, 2, 2),
                         new_token=(on(k_new), on(values[:, :, n]), None, None))
        torch.testing.assert_close(o.cpu().double(), o_ref, atol=0.03, rtol=0.03, msg=f"step at slot {n}")
        start = window * (n // window)  # the next step's window: [start, n]
        in_ring = ring[:, :, torch.arange(start, n + 1) % (2 * window)].cpu().double()
        torch.testing.assert_close(in_ring, exact[:, :, start : n + 1], atol=1e-5, rtol=1e-5, msg=f"ring at slot {n}")
        torch.testing.assert_close(keys[:, :, start : n + 1].cpu().double(), in_ring, atol=0.02, rtol=2**-7)
    framed = window * ((L - 1) // window)
    carried = keys.cpu().double().clone()
    carried[:, :, :framed] = carried[:, :, :framed] @ frames[:, L % 2].cpu().double().transpose(-1, -2)

    def err(k):
        return ((k[:, :, :L] - exact).norm() / exact.norm()).item()

    assert err(carried) < 0.02
    assert err(carried) < err(every_step.cpu().double()) / 2, (err(carried), err(every_step.cpu().double()))


@pytest.mark.kernel
def test_decode_kernel_ring_needs_frames_and_the_new_token():
    pytest.importorskip("triton")
    from path_lm.path_triton import decode_attention

    B, H, D, L = 1, 1, 16, 40
    args = (torch.randn(B, H, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D), F.normalize(torch.randn(B, H, D), dim=-1),
            torch.rand(B, H), 20)
    args = tuple(a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    ring = torch.zeros(B, H, 32, D, device=KERNEL_DEVICE)
    frames = torch.eye(D, device=KERNEL_DEVICE).expand(B, 2, H, D, D).contiguous()
    new = (args[1][:, :, 0], args[2][:, :, 0], None, None)
    with pytest.raises(ValueError, match="needs frames and new_token"):
        decode_attention(*args, scale=0.25, window=16, ring=ring, new_token=new)
    with pytest.raises(ValueError, match="needs frames and new_token"):
        decode_attention(*args, scale=0.25, window=16, ring=ring, frames=frames, launch=(16, 2, 2))
    with pytest.raises(ValueError, match="ring must be"):
        decode_attention(*args, scale=0.25, window=16, ring=ring[:, :, :16], frames=frames, new_token=new,
                         launch=(16, 2, 2))


@pytest.mark.kernel
def test_key_rounding_benchmark_carries_framed_keys_correctly():
    """benchmarks/decode_key_rounding.py: its frame simulation reproduces the exact keys up to rounding
    (a wrong carry would be off by O(1)), and the orders of the schemes are the ones docs/kernels.md reports."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_key_rounding.py"
    spec = importlib.util.spec_from_file_location("decode_key_rounding", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.run(steps=300, D=16, window=16, seed=1)
    f32, b16, frames, frames_f32_window, floor = (res[name]["key"] for name in bench.SCHEMES)
    assert f32 < 1e-5
    assert floor < frames_f32_window < frames < b16 < 0.05


def test_eager_step_makes_one_triton_launch_per_layer(tmp_path):
    """benchmarks/cpu_decode_host.py: an eager decoding step on the CUDA code path launches one kernel per
    layer on a short dynamic cache, which computes the step's inputs and its attention, and two past
    EAGER_KEYS_PER_SPLIT cached keys (the same kernel over splits, then the merge), and nothing else from
    Triton; the script puts the real kernels back afterwards. ``--baseline`` (here this checkout itself)
    times a second copy of the package in the same turns."""
    pytest.importorskip("triton")
    import importlib.util
    import json
    import sys
    from pathlib import Path

    from path_lm import path_ops, path_triton

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location("cpu_decode_host", bench_dir / "cpu_decode_host.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        kernel, usable = path_triton._decode_kernel, path_ops.decode_kernel_usable
        long = path_ops.EAGER_KEYS_PER_SPLIT + 100
        assert bench.main(["--tiny", "--contexts", "16", str(long), "--baseline", str(bench_dir.parent),
                           "--json", str(tmp_path / "host.json")]) == 0
    finally:
        sys.path.remove(str(bench_dir))
    records = {(r["model"].split()[1], r["context"]): r for r in json.loads((tmp_path / "host.json").read_text())["records"]}
    for model in ("(CUDA", "baseline"):
        assert records[model, 16]["launches"] == {"_decode_step_kernel": 2}  # 2 layers
        assert records[model, long]["launches"] == {"_decode_step_kernel": 2, "_decode_merge_kernel": 2}
    assert records["(CPU", 16]["triton_launches"] == records["(CPU", long]["triton_launches"] == 0
    assert records["(CPU", 16]["vs_llama"] == 1.0
    assert path_triton._decode_kernel is kernel and path_ops.decode_kernel_usable is usable
