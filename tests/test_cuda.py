"""GPU tests: the model on each Triton kernel backend (path-lm's own, fla's) against the exact PyTorch path.

Skipped without CUDA (fla's cases also without fla). Run on a GPU machine with
`python -m pytest -q tests/test_cuda.py tests/test_kernels.py`.
"""

import pytest
import torch
import torch.nn.functional as F
from test_generation import CACHE_KW

from path_lm import PaTHCache, PaTHConfig, PaTHForCausalLM
from path_lm.path_ops import path_attention_fla, path_attention_torch, resolve_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KERNELS = ["triton", "fla"]


def needs(kernel):
    if kernel == "fla":
        pytest.importorskip("fla.ops.path_attn.parallel")

DEVICE = "cuda"


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def op_inputs(B, T, HQ, H, D, dtype, gate=True, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, device=DEVICE, generator=gen)  # noqa: E731
    q, k, v = rand(B, T, HQ, D).to(dtype), rand(B, T, H, D).to(dtype), rand(B, T, H, D).to(dtype)
    w = F.normalize(rand(B, T, H, D), dim=-1)
    beta = 2 * torch.rand(B, T, H, device=DEVICE, generator=gen)
    g = F.logsigmoid(rand(B, T, HQ) + 2) if gate else None
    return [x.requires_grad_() if x is not None else None for x in (q, k, v, w, beta, g)]


def small_config(**overrides):
    base = dict(
        vocab_size=128, hidden_size=256, num_hidden_layers=2, num_heads=4, num_kv_heads=2, use_forget_gate=True,
        use_qk_norm=True, conv_bias=True, initializer_range=0.1, pad_token_id=0,
    )
    base.update(overrides)
    return PaTHConfig(**base)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fla_op_forward_and_gradients_match_torch(D, gate, dtype):
    needs("fla")
    inputs = op_inputs(2, 300, 4, 2, D, dtype, gate)
    o_fla, _ = path_attention_fla(*inputs)
    do = torch.randn_like(o_fla)
    grads_fla = torch.autograd.grad(o_fla, [x for x in inputs if x is not None], do)
    ref_inputs = [x.detach().double().requires_grad_() if x is not None else None for x in inputs]
    o_ref, _ = path_attention_torch(*ref_inputs)
    grads_ref = torch.autograd.grad(o_ref, [x for x in ref_inputs if x is not None], do.double())
    tol = 2e-2
    assert rel_err(o_fla, o_ref) < tol
    names = ["q", "k", "v", "w", "beta", "g"]
    for name, a, b in zip(names, grads_fla, grads_ref):
        assert rel_err(a, b) < 2 * tol, name


def test_fla_packed_and_padded_segments_match_torch():
    needs("fla")
    inputs = op_inputs(2, 200, 4, 2, 64, torch.bfloat16)
    segment_ids = torch.zeros(2, 200, dtype=torch.long, device=DEVICE)
    segment_ids[0, 70:] = 1
    segment_ids[0, 150:] = 2
    segment_ids[1, :33] = -1  # left padding
    o_fla, keys_kernel = path_attention_fla(*inputs, segment_ids=segment_ids, output_keys=True)
    ref = [x.detach().double() if x is not None else None for x in inputs]
    o_ref, _ = path_attention_torch(*ref, segment_ids=segment_ids)
    assert rel_err(o_fla, o_ref) < 2e-2
    # keys carried to the end of row 1 (its real tokens are one sequence) match the torch prefill state
    _, state = path_attention_torch(*[x[1:, 33:] if x is not None else None for x in ref], output_state=True)
    assert rel_err(keys_kernel[1:, 33:], state.keys) < 2e-2


def test_backend_resolution():
    needs("fla")
    q = torch.randn(1, 4, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    assert resolve_backend("auto", q, q) == "fla"  # the faster one at this length (docs/benchmarks.md)
    long = torch.randn(1, 8192, 1, 64, device=DEVICE, dtype=torch.bfloat16)
    assert resolve_backend("auto", long, long) == "triton"  # long prefill
    assert resolve_backend("auto", long.requires_grad_(), long) == "triton"  # training
    assert resolve_backend("triton", q, q) == "triton"
    assert resolve_backend("auto", q.cpu(), q.cpu()) == "torch"
    assert resolve_backend("auto", q.float(), q.float()) == "torch"
    q32 = torch.randn(1, 4, 2, 32, device=DEVICE, dtype=torch.bfloat16)
    assert resolve_backend("auto", q32, q32) == "torch"  # fla 0.6.0's backward faults at head dim 32
    with pytest.raises(RuntimeError, match="head dims"):
        resolve_backend("triton", q32, q32)
    q48 = torch.randn(1, 4, 2, 48, device=DEVICE, dtype=torch.bfloat16)
    assert resolve_backend("auto", q48, q48) == "torch"
    with pytest.raises(RuntimeError, match="head dims"):
        resolve_backend("fla", q48, q48)


@pytest.mark.parametrize("kernel", KERNELS)
def test_model_logits_loss_and_gradients_match_torch_backend(kernel):
    needs(kernel)
    torch.manual_seed(0)
    model_kernel = PaTHForCausalLM(small_config(attn_backend=kernel)).to(DEVICE, torch.bfloat16)
    model_torch = PaTHForCausalLM(small_config(attn_backend="torch")).to(DEVICE, torch.bfloat16)
    model_torch.load_state_dict(model_kernel.state_dict())
    ids = torch.randint(1, 128, (3, 150), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0  # left padding
    mask[2, 120:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    outs = []
    for model in (model_kernel, model_torch):
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        outs.append(out)
    real = mask.bool()
    assert rel_err(outs[0].logits[real], outs[1].logits[real]) < 2e-2
    assert abs(outs[0].loss.item() - outs[1].loss.item()) < 2e-2
    for (name, p1), p2 in zip(model_kernel.named_parameters(), model_torch.parameters()):
        assert rel_err(p1.grad, p2.grad) < 5e-2, name


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_position_ids_match_separate_documents(kernel):
    needs(kernel)
    torch.manual_seed(0)
    model = PaTHForCausalLM(small_config(attn_backend=kernel)).to(DEVICE, torch.bfloat16).eval()
    docs = [torch.randint(1, 128, (n,), device=DEVICE) for n in (37, 80, 11)]
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d), device=DEVICE) for d in docs])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids, use_cache=False).logits[0]
        alone = torch.cat([model(d[None], use_cache=False).logits[0] for d in docs])
    assert rel_err(packed_logits, alone) < 1e-2


@pytest.mark.parametrize("kernel", KERNELS)
def test_prefill_cache_and_generate_match_torch_backend(kernel):
    needs(kernel)
    torch.manual_seed(0)
    config = dict(initializer_range=0.3)  # peaked logits: greedy tokens are robust to bf16 rounding
    model_kernel = PaTHForCausalLM(small_config(attn_backend=kernel, **config)).to(DEVICE, torch.bfloat16).eval()
    model_torch = PaTHForCausalLM(small_config(attn_backend="torch", **config)).to(DEVICE, torch.bfloat16).eval()
    model_torch.load_state_dict(model_kernel.state_dict())
    ids = torch.randint(1, 128, (2, 70), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :25] = 0
    caches = []
    with torch.no_grad():
        for model in (model_kernel, model_torch):
            cache = PaTHCache(model.config)
            model(ids, attention_mask=mask, cache=cache, use_cache=True)
            caches.append(cache)
        for layer_kernel, layer_torch in zip(caches[0].layers, caches[1].layers):
            keys_kernel, keys_torch = layer_kernel.keys_view(), layer_torch.keys_view()
            assert rel_err(keys_kernel[0], keys_torch[0]) < 2e-2
            assert rel_err(keys_kernel[1, :, 25:], keys_torch[1, :, 25:]) < 2e-2
        gen = model_kernel.generate(
            ids, attention_mask=mask, max_new_tokens=30, do_sample=False, output_scores=True,
            return_dict_in_generate=True,
        )
        new = gen.sequences[:, 70:]
        # The exact PyTorch backend's full forward over the generated sequence, without a cache.
        full_mask = torch.cat([mask, torch.ones_like(new)], 1)
        logits = model_torch(gen.sequences, attention_mask=full_mask, use_cache=False).logits.float()[:, 69:-1]
    # Each step's cached-decoding logits are the full forward's, and each greedy token is its argmax up to
    # bf16 resolution (comparing two bf16 generations token for token breaks on exact ties: seen once).
    # Steps up to each row's end-of-sequence token (after it generate() only pads).
    eos = new == model_kernel.generation_config.eos_token_id
    live = (eos.cumsum(1) - eos.long()) == 0
    assert live[:, :2].all()
    scores = torch.stack(gen.scores, 1)
    assert rel_err(scores[live], logits[live]) < 2e-2
    chosen = logits.gather(-1, new[..., None])[..., 0]
    assert (chosen >= logits.max(-1).values - 0.01 * logits.abs().amax())[live].all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_training_stays_finite(kernel):
    needs(kernel)
    beta_max = None
    torch.manual_seed(0)
    config = small_config(attn_backend=kernel, beta_max=beta_max, initializer_range=0.02, num_hidden_layers=4)
    model = PaTHForCausalLM(config).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # a learnable signal: counting sequences (next id = id + 1) from random starts
    losses = []
    for step in range(300):
        starts = torch.randint(0, 127, (8, 1), device=DEVICE)
        ids = (starts + torch.arange(256, device=DEVICE)) % 127 + 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        assert torch.isfinite(loss), f"non-finite loss at step {step}"
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


# ---------------------------------------------------------------------------------------------------------
# Decoding: the fused Triton step, the static cache under torch.compile + CUDA graphs
# ---------------------------------------------------------------------------------------------------------


LAUNCH_CACHE_SIZES = [2**16, 2**18]  # one per branch of path_triton._decode_launch


@pytest.mark.parametrize("cache_keys", LAUNCH_CACHE_SIZES, ids=lambda k: f"launch_for_2^{k.bit_length() - 1}_keys")
@pytest.mark.parametrize("HQ", [4, 16], ids=["mha", "gqa"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_matches_torch_step_at_gpu_sizes(D, key_dtype, HQ, cache_keys, monkeypatch):
    """Gates, padding, with and without grouped query heads; every launch configuration
    path_triton._decode_launch picks (the one it picks for a cache of `cache_keys` keys, run on a cache of
    5000 slots), with frames too (output only: framed keys stay in their frame)."""
    from path_lm import path_triton

    launch = path_triton._decode_launch(D, D, HQ // 4, cache_keys)
    smaller = LAUNCH_CACHE_SIZES[: LAUNCH_CACHE_SIZES.index(cache_keys)]
    if any(path_triton._decode_launch(D, D, HQ // 4, k) == launch for k in smaller):
        pytest.skip(f"launch {launch} is tested with a smaller cache")
    monkeypatch.setattr(path_triton, "_decode_launch", lambda *shape: launch)
    from path_lm.path_ops import path_decode_step

    B, H, L = 4, 4, 5000
    gen = torch.Generator(device=DEVICE).manual_seed(D)
    rand = lambda *s: torch.randn(*s, device=DEVICE, generator=gen)  # noqa: E731
    q, v = rand(B, 1, HQ, D).bfloat16(), rand(B, L + 1, H, D).bfloat16()
    w, beta = F.normalize(rand(B, 1, H, D), dim=-1), 2 * torch.rand(B, 1, H, device=DEVICE, generator=gen)
    keys = rand(B, H, L + 1, D).to(key_dtype)
    values = v.transpose(1, 2).contiguous()
    gates = -torch.rand(B, HQ, L + 1, device=DEVICE, generator=gen).cumsum(-1) * 0.01
    key_mask = torch.rand(B, L + 1, device=DEVICE, generator=gen) > 0.1
    key_mask[:, -1] = True
    keys_kernel = keys.clone()
    args = dict(gate=gates, key_mask=key_mask)
    o_kernel = path_decode_step(q, keys_kernel, values, w, beta, use_kernel=True, **args)
    keys_torch = keys.double()  # exact reference: the PyTorch step in float64
    o_torch = path_decode_step(q.double(), keys_torch, values.double(), w.double(), beta.double(), **args)
    assert rel_err(o_kernel, o_torch) < 1e-2
    tol = 1e-6 if key_dtype == torch.float32 else 1e-2
    assert rel_err(keys_kernel, keys_torch) < tol
    if key_dtype == torch.float32:
        frames = torch.eye(D, device=DEVICE).expand(B, 2, H, D, D).contiguous()
        o_framed = path_decode_step(q, keys.clone(), values, w, beta, use_kernel=True, frames=frames, window=64, **args)
        assert rel_err(o_framed, o_torch) < 1e-2


def _decoding_pair(dtype, **overrides):
    """The same weights twice: the default backend (path-lm's decoding kernel) and the exact PyTorch one."""
    torch.manual_seed(0)
    model = PaTHForCausalLM(small_config(initializer_range=0.3, **overrides)).to(DEVICE, dtype).eval()
    reference = PaTHForCausalLM(small_config(attn_backend="torch", initializer_range=0.3, **overrides))
    reference.load_state_dict(model.state_dict())
    return model, reference.to(DEVICE, dtype).eval()


@torch.no_grad()
def test_compiled_static_generate_matches_uncompiled_float32():
    """generate(cache_implementation="static") on CUDA compiles the decoding step (torch.compile, CUDA
    graphs); its greedy tokens equal the uncompiled dynamic cache's with PyTorch ops, over two calls (the
    second replays the compiled step on a new cache)."""
    torch.compiler.reset()  # a fresh compile: inductor has failed on graphs cached by an earlier test
    model, reference = _decoding_pair(torch.float32)
    ids = torch.randint(3, 128, (3, 100), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    options = dict(attention_mask=mask, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    expected = reference.generate(ids, **options)
    assert torch.equal(model.generate(ids, **options), expected)  # dynamic cache, decoding kernel
    for _ in range(2):
        assert torch.equal(model.generate(ids, cache_implementation="static", **options), expected)


@torch.no_grad()
@pytest.mark.parametrize("key_dtype", ["float32", "mixed"])
@pytest.mark.parametrize("cache_implementation", ["static", None], ids=["compiled_static", "dynamic"])
def test_decoding_bf16_drift_bounded(cache_implementation, key_dtype):
    """bf16, 200 decoding steps (compiled on a static cache, or eager on the dynamic cache: the step inputs'
    kernel and the kernel-written slots) with the forget gates biased towards 1 (old keys keep weight): the
    last step's logits differ from a float64 forward of the same weights by at most 2x the bf16 full
    forward's own error (the bound of the CPU drift test). "mixed": bf16 keys rewritten once per 64 steps,
    the window's keys in float32 (three folds in 200 steps)."""
    torch.compiler.reset()  # a fresh compile: inductor has failed on graphs cached by an earlier test
    model, reference = _decoding_pair(torch.bfloat16, cache_key_dtype=key_dtype)
    for block in model.model.layers:
        block.attn.g_proj.bias.data.fill_(4.0)
    reference.load_state_dict(model.state_dict())
    ref64 = reference.double()
    ids = torch.randint(3, 128, (2, 64), device=DEVICE)
    out = model.generate(ids, max_new_tokens=200, min_new_tokens=200, do_sample=False,
                         cache_implementation=cache_implementation, output_logits=True, return_dict_in_generate=True)
    context = out.sequences[:, :-1]
    exact = ref64(context, use_cache=False).logits[:, -1]
    full_err = (model(context, use_cache=False).logits[:, -1].double() - exact).abs().max().item()
    step_err = (out.logits[-1].double() - exact).abs().max().item()
    print(f"\nbf16, 200 {cache_implementation or 'dynamic'} steps, {key_dtype} keys: max |logit error| full forward "
          f"{full_err:.4g}, decoding {step_err:.4g}")
    assert full_err > 0
    assert step_err <= 2 * full_err + 0.01
    if key_dtype == "mixed":  # bf16 keys beside the float32 ring, on the decoding kernel's cache
        cache = getattr(model(ids, use_cache=True), CACHE_KW)
        model(ids[:, -1:], use_cache=True, **{CACHE_KW: cache})  # one decoding step: the frames exist from then on
        layer = cache.layers[0]
        assert layer.keys.dtype == torch.bfloat16 and layer.key_ring is not None and layer.frames is not None
