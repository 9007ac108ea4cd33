"""Tests of the path_lm models (config, layer, base model, causal LM, sequence classification).

The causal LM is compared with an independent float64 reference (tests/reference_model.py) that reads the
weights by checkpoint key name and uses the explicit PaTH formula of tests/reference.py. The rest checks
invariances (padding, packing), transformers integration (loss, logits_to_keep, hidden states, gradient
checkpointing, auto classes) and the config. Tiny sizes, CPU, fixed seeds; every option on unless a case
says otherwise, and attn_chunk_size 4 or 8 so that several blocks (and a partial last one) are exercised.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from reference_model import (
    Weights,
    attention_kwargs,
    causal_depthwise_conv,
    causal_depthwise_conv_loop,
    reference_attention,
    reference_causal_lm_logits,
    reference_hidden_states,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorWithFlattening,
)

import path_lm
from path_lm import PaTHAttention, PaTHConfig, PaTHForCausalLM, PaTHForSequenceClassification, PaTHModel

F64 = dict(rtol=1e-9, atol=1e-9)
F32 = dict(rtol=1e-4, atol=1e-4)
# Self-consistency of two float64 runs of the same model (padding / packing / checkpointing). Loose enough
# not to depend on the float32 rounding inside the model (see test_float64_model_keeps_float64_precision);
# real masking or segmentation errors are orders of magnitude larger.
SAME = dict(rtol=1e-6, atol=1e-6)
# transformers' causal LM loss upcasts logits with .float(), i.e. computes in float32 even for float64 models.
LOSS = dict(rtol=1e-6, atol=1e-6)

PAD = 0
VOCAB = 61

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=40,
    hidden_act="swish",
    use_forget_gate=True,
    use_qk_norm=True,
    use_w_shortconv=True,
    use_low_rank_w=True,
    conv_size=3,
    conv_bias=True,
    tie_word_embeddings=False,
    attn_chunk_size=4,
    attn_backend="torch",
    pad_token_id=PAD,
)


def make_config(**overrides):
    return PaTHConfig(**{**BASE, **overrides})


@torch.no_grad()
def randomize_(model, seed=0):
    """Replace the tiny default init by O(1) random weights so that every part of the computation (beta
    spread over (0, 2), gates, norms, conv bias) visibly affects the output."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if name.endswith("bias"):
            value = 0.7 * r
        elif p.dim() == 1:  # norm weights
            value = 1 + 0.3 * r
        elif "embeddings" in name:
            value = r
        elif "conv1d" in name:
            value = 0.7 * r
        else:
            value = r / math.sqrt(p.shape[1])
        p.copy_(value.to(p.dtype))
    return model


def make_model(config, cls=PaTHForCausalLM, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = randomize_(cls(config), seed)
    return model.to(dtype).eval()


def random_ids(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, shape, generator=gen)  # never the pad id


def assert_close(actual, expected, tol, msg=""):
    actual = actual.to(torch.float64)
    expected = expected.to(torch.float64)
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, **tol), f"{msg} max abs error {err:.3e} (atol {tol['atol']:.0e})"


# ------------------------------------------------------------------------------------------------------------
# 1. Full model vs the independent float64 reference
# ------------------------------------------------------------------------------------------------------------

REFERENCE_CASES = {
    "all_on_lowrank_untied_convbias": dict(),
    "fullrank_tied_noconvbias_chunk8_conv4": dict(
        use_low_rank_w=False, tie_word_embeddings=True, conv_bias=False, attn_chunk_size=8, conv_size=4
    ),
    "lowrank_tied_mqa_gelu_default_intermediate": dict(
        tie_word_embeddings=True, num_kv_heads=1, intermediate_size=None, hidden_act="gelu", hidden_size=24,
        num_heads=3,
    ),
    "fullrank_untied_no_gqa_chunk8": dict(use_low_rank_w=False, num_kv_heads=4, attn_chunk_size=8),
    "options_off": dict(use_forget_gate=False, use_qk_norm=False, use_w_shortconv=False, conv_bias=False),
}
if "beta_max" in inspect.signature(PaTHConfig.__init__).parameters:  # path_lm's optional beta clip
    REFERENCE_CASES["beta_max"] = dict(beta_max=1.2, tie_word_embeddings=True)


def test_reference_conv_forms_agree():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 1, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(causal_depthwise_conv(x, weight, bias), causal_depthwise_conv_loop(x, weight, bias))
    # causality: changing a later input leaves earlier outputs alone
    x2 = x.clone()
    x2[:, 4] += 1
    torch.testing.assert_close(causal_depthwise_conv(x2, weight)[:, :4], causal_depthwise_conv(x, weight)[:, :4])


@pytest.mark.parametrize("case", list(REFERENCE_CASES), ids=list(REFERENCE_CASES))
def test_causal_lm_matches_reference_float32(case):
    config = make_config(**REFERENCE_CASES[case])
    model = make_model(config, dtype=torch.float32)
    ids = random_ids(2, 11, seed=1)
    expected, weights = reference_causal_lm_logits(model.state_dict(), config, ids, return_weights=True)

    # The checkpoint holds exactly the parameters that fla's description names.
    unused = weights.unused() - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    assert not unused, f"state_dict keys the reference never read: {sorted(unused)}"
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embeddings.weight

    with torch.no_grad():
        for use_cache in (False, None):  # eval default use_cache=True goes through the cache prefill
            logits = model(ids, use_cache=use_cache).logits
            assert logits.dtype == torch.float32
            assert_close(logits, expected, F32, f"use_cache={use_cache}")


@pytest.mark.parametrize("case", list(REFERENCE_CASES), ids=list(REFERENCE_CASES))
def test_causal_lm_matches_reference_float64(case):
    config = make_config(**REFERENCE_CASES[case])
    model = make_model(config, dtype=torch.float64)
    ids = random_ids(2, 11, seed=2)
    expected = reference_causal_lm_logits(model.state_dict(), config, ids)
    with torch.no_grad():
        for use_cache in (False, None):
            logits = model(ids, use_cache=use_cache).logits
            assert logits.dtype == torch.float64
            assert_close(logits, expected, F64, f"use_cache={use_cache}")


def test_float64_model_keeps_float64_precision():
    """Minimal failing case: a float64 model must compute its RMSNorms, beta, g and the w normalization in
    float64. path_lm casts them with `.float()` (meant as an upcast from half precision), which in a
    float64 model is a DOWNcast to float32, so its results are only float32-accurate (~1e-7)."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    norm = path_lm.modeling_path.PaTHRMSNorm(8).double()
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert_close(norm(x), expected, dict(rtol=1e-12, atol=1e-12), "PaTHRMSNorm in float64:")

    layer = PaTHAttention(hidden_size=8, num_heads=2, use_w_shortconv=False, use_forget_gate=True).double()
    randomize_(layer)
    expected = reference_attention(
        Weights(layer.state_dict()), "", x, hidden_size=8, num_heads=2, num_kv_heads=2, use_forget_gate=True,
        use_qk_norm=False, use_low_rank_w=True, use_w_shortconv=False, conv_bias=False,
    )
    assert_close(layer(x)[0], expected, dict(rtol=1e-12, atol=1e-12), "PaTHAttention in float64:")


# ------------------------------------------------------------------------------------------------------------
# 2. Padding and packing invariance
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_in_half_precision_rounds_once_from_float32(dtype, device):
    """PaTHRMSNorm on half-precision inputs equals the float32 formula x * rsqrt(mean(x^2) + eps) * weight
    rounded once to the input dtype (one rounding step apart at most, from the order of the float32 sum)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(0)
    norm = path_lm.modeling_path.PaTHRMSNorm(768, eps=1e-6)
    norm.weight.data = 1 + 0.3 * torch.randn(768, generator=gen)
    norm = norm.to(device, dtype)
    x = (3 * torch.randn(64, 768, generator=gen)).to(device, dtype)
    x32, w32 = x.float(), norm.weight.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * w32).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    step = torch.finfo(dtype).eps * expected.float().abs()
    assert ((out.float() - expected.float()).abs() <= step).all()
    assert (out == expected).float().mean() > 0.99


def padded_batch(seqs, side, T):
    ids = torch.full((len(seqs), T), PAD)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s)
        if side == "right":
            ids[b, :n], mask[b, :n] = s, 1
        else:
            ids[b, T - n :], mask[b, T - n :] = s, 1
    return ids, mask


def real_slice(side, T, n):
    return slice(0, n) if side == "right" else slice(T - n, T)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_invariance(side):
    config = make_config()
    model = make_model(config)
    lengths = [11, 7, 4, 1]
    seqs = [random_ids(n, seed=10 + i) for i, n in enumerate(lengths)]
    T = max(lengths)
    ids, mask = padded_batch(seqs, side, T)
    with torch.no_grad():
        alone = [model(s[None], use_cache=False).logits[0] for s in seqs]
        runs = {
            "no cache": model(ids, attention_mask=mask, use_cache=False).logits,
            "cache prefill": model(ids, attention_mask=mask).logits,
        }
        if side == "left":  # as generate() writes them: position ids restarting after the left padding
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            runs["generate position_ids"] = model(
                ids, attention_mask=mask, position_ids=position_ids, use_cache=False
            ).logits
    for name, logits in runs.items():
        assert torch.isfinite(logits).all(), name
        for b, n in enumerate(lengths):
            assert_close(logits[b, real_slice(side, T, n)], alone[b], SAME, f"{name}, row {b}:")


def test_padding_matches_reference_float32():
    """Left padding against the independent reference of each sequence alone (not only self-consistency)."""
    config = make_config()
    model = make_model(config, dtype=torch.float32)
    seqs = [random_ids(9, seed=20), random_ids(5, seed=21)]
    ids, mask = padded_batch(seqs, "left", 9)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=False).logits
    for b, s in enumerate(seqs):
        expected = reference_causal_lm_logits(model.state_dict(), config, s[None])[0]
        assert_close(logits[b, 9 - len(s) :], expected, F32, f"row {b}:")


def test_mask_with_hole_and_empty_row_stay_finite():
    config = make_config()
    model = make_model(config)
    ids = random_ids(3, 12, seed=30)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 4:7] = 0  # a hole in the middle
    mask[1, 0] = 0
    mask[1, -1] = 0  # both sides
    mask[2] = 0  # nothing real at all
    with torch.no_grad():
        for use_cache in (False, None):
            logits = model(ids, attention_mask=mask, use_cache=use_cache).logits
            assert logits.shape == (3, 12, VOCAB)
            assert torch.isfinite(logits[mask.bool()]).all()
            assert torch.isfinite(logits).all()
    # a row padded on both sides equals its real part alone
    with torch.no_grad():
        alone = model(ids[1:2, 1:-1], use_cache=False).logits[0]
    assert_close(logits[1, 1:-1], alone, SAME)


DOC_LENGTHS = [5, 9, 2, 6, 1]


def packing_features(lengths=DOC_LENGTHS, seed=40):
    return [{"input_ids": random_ids(n, seed=seed + i).tolist()} for i, n in enumerate(lengths)]


def check_docs(logits, docs, model):
    assert logits.shape[0] == 1
    start = 0
    for i, doc in enumerate(docs):
        n = len(doc["input_ids"])
        with torch.no_grad():
            alone = model(torch.tensor([doc["input_ids"]]), use_cache=False).logits[0]
        assert_close(logits[0, start : start + n], alone, SAME, f"document {i}:")
        start += n
    assert start == logits.shape[1]


@pytest.mark.parametrize("use_cache", [False, None])
def test_packing_with_position_ids(use_cache):
    model = make_model(make_config())
    feats = packing_features()
    batch = DataCollatorWithFlattening()(feats)
    assert batch["position_ids"][0].tolist() == [i for n in DOC_LENGTHS for i in range(n)]
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=use_cache
        ).logits
    check_docs(logits, feats, model)


def test_packing_two_rows_with_position_ids():
    """Packed rows of equal length stacked in a batch: each row's documents are separated independently."""
    model = make_model(make_config())
    rows = [packing_features([4, 7, 3], seed=45), packing_features([9, 5], seed=48)]
    ids = torch.stack([torch.tensor(sum((d["input_ids"] for d in row), [])) for row in rows])
    position_ids = torch.stack(
        [torch.tensor([i for d in row for i in range(len(d["input_ids"]))]) for row in rows]
    )
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    for b, row in enumerate(rows):
        check_docs(logits[b : b + 1], row, model)


def test_packing_with_cu_seq_lens():
    model = make_model(make_config())
    feats = packing_features(seed=50)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(feats)
    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and cu.shape == (len(feats) + 1,)
    with torch.no_grad():
        # cu_seq_lens_q alone (no position ids) ...
        logits = model(input_ids=batch["input_ids"], cu_seq_lens_q=cu, use_cache=False).logits
        check_docs(logits, feats, model)
        # ... and everything the collator returns, labels included
        out = model(**batch, use_cache=False)
        check_docs(out.logits, feats, model)
        assert torch.isfinite(out.loss)


def test_packed_loss_equals_token_weighted_document_losses():
    model = make_model(make_config())
    feats = packing_features(seed=60)
    batch = DataCollatorWithFlattening()(feats)
    with torch.no_grad():
        packed = model(**batch, use_cache=False).loss
        total, count = 0.0, 0
        for doc in feats:
            ids = torch.tensor([doc["input_ids"]])
            n = ids.shape[1] - 1  # predicted tokens of the document
            if n == 0:
                continue
            total += model(ids, labels=ids, use_cache=False).loss * n
            count += n
    assert count == int((batch["labels"] != -100).sum())
    assert_close(packed, total / count, SAME)


# ------------------------------------------------------------------------------------------------------------
# 3. transformers' causal LM interface
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    return make_model(make_config())


def test_inputs_embeds_equals_input_ids(lm):
    ids = random_ids(2, 10, seed=70)
    with torch.no_grad():
        a = lm(input_ids=ids, use_cache=False).logits
        b = lm(inputs_embeds=lm.get_input_embeddings()(ids), use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError):
        lm(input_ids=ids, inputs_embeds=lm.get_input_embeddings()(ids))


@pytest.mark.parametrize("keep", [1, 3, "tensor"])
def test_logits_to_keep(lm, keep):
    ids = random_ids(2, 10, seed=71)
    with torch.no_grad():
        full = lm(ids, use_cache=False).logits
        if keep == "tensor":
            index = torch.tensor([0, 4, 9, 5])
            expected = full[:, index]
        else:
            index = keep
            expected = full[:, -keep:]
        kept = lm(ids, use_cache=False, logits_to_keep=index).logits
    assert kept.shape == expected.shape
    assert_close(kept, expected, F64)


def test_output_hidden_states(lm):
    config = lm.config
    ids = random_ids(2, 10, seed=72)
    with torch.no_grad():
        out = lm(ids, output_hidden_states=True, use_cache=False)
        base = lm.model(ids, use_cache=False)
    states = out.hidden_states
    assert len(states) == config.num_hidden_layers + 1
    torch.testing.assert_close(states[0], lm.model.embeddings(ids), rtol=0, atol=0)
    torch.testing.assert_close(states[-1], base.last_hidden_state, rtol=0, atol=0)
    _, ref_states = reference_hidden_states(Weights(lm.state_dict()), config, ids)
    for i, (s, r) in enumerate(zip(states, ref_states)):
        assert_close(s, r, SAME, f"hidden state {i}:")
    # the last one is the final normed state: the logits are lm_head of it
    assert_close(out.logits, states[-1] @ lm.lm_head.weight.T, F64)


def test_return_dict_false_returns_tuple(lm):
    ids = random_ids(2, 6, seed=73)
    with torch.no_grad():
        expected = lm(ids, labels=ids, use_cache=False)
        out = lm(ids, use_cache=False, return_dict=False)
        with_loss = lm(ids, labels=ids, use_cache=False, return_dict=False)
        base = lm.model(ids, use_cache=False, return_dict=False)
    assert isinstance(out, tuple) and isinstance(with_loss, tuple) and isinstance(base, tuple)
    torch.testing.assert_close(out[0], expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(with_loss[0], expected.loss, rtol=0, atol=0)
    torch.testing.assert_close(with_loss[1], expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(base[0], lm.model(ids, use_cache=False).last_hidden_state, rtol=0, atol=0)


def labels_with_ignored(ids):
    labels = ids.clone()
    labels[0, 2] = -100
    labels[1, 5:] = -100
    return labels


def test_loss_is_shifted_cross_entropy(lm):
    ids = random_ids(2, 10, seed=74)
    labels = labels_with_ignored(ids)
    with torch.no_grad():
        out = lm(ids, labels=labels, use_cache=False)
    manual = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert_close(out.loss, manual, LOSS)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_loss_with_num_items_in_batch(lm, as_tensor):
    ids = random_ids(2, 10, seed=75)
    labels = labels_with_ignored(ids)
    num_items = 23
    with torch.no_grad():
        out = lm(
            ids, labels=labels, use_cache=False,
            num_items_in_batch=torch.tensor(num_items) if as_tensor else num_items,
        )
    summed = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert_close(out.loss, summed / num_items, LOSS)


# ------------------------------------------------------------------------------------------------------------
# 4. Gradient checkpointing
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_same_gradients(use_reentrant):
    config = make_config()
    ids = random_ids(2, 10, seed=80)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    labels = ids.masked_fill(mask == 0, -100)

    def run(checkpointing):
        model = make_model(config).train()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 (the old name warns)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
                assert model.is_activation_checkpointing
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
                assert model.is_gradient_checkpointing
        calls = []
        model.model.layers[0].attn.register_forward_hook(lambda *a: calls.append(1))
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return loss.detach(), grads, len(calls)

    loss_ref, grads_ref, calls_ref = run(False)
    loss_gc, grads_gc, calls_gc = run(True)
    assert calls_ref == 1 and calls_gc == 2  # the layer really was recomputed in backward
    assert_close(loss_gc, loss_ref, F64)
    assert grads_ref.keys() == grads_gc.keys()
    for name in grads_ref:
        assert grads_ref[name].abs().sum() > 0, f"no gradient reached {name}"
        assert_close(grads_gc[name], grads_ref[name], F64, name)


# ------------------------------------------------------------------------------------------------------------
# 5. Sequence classification and auto classes
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_classification_pools_last_real_token(side):
    config = make_config(num_labels=3)
    clf = make_model(config, cls=PaTHForSequenceClassification)
    lengths = [10, 6, 3]
    seqs = [random_ids(n, seed=90 + i) for i, n in enumerate(lengths)]
    ids, mask = padded_batch(seqs, side, 10)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = clf(input_ids=ids, attention_mask=mask, labels=labels)
        expected = torch.stack(
            [clf.score(clf.model(s[None], use_cache=False).last_hidden_state[0, -1]) for s in seqs]
        )
    assert out.logits.shape == (3, 3)
    assert_close(out.logits, expected, SAME)
    assert_close(out.loss, F.cross_entropy(out.logits, labels), LOSS)
    # and against the independent reference of the backbone
    weights = Weights(clf.state_dict())
    for b, s in enumerate(seqs):
        hidden, _ = reference_hidden_states(weights, config, s[None])
        assert_close(out.logits[b], hidden[0, -1] @ weights("score.weight").T, SAME, f"row {b}:")
    assert weights.unused() == set()


def test_sequence_classification_backward():
    config = make_config(num_labels=2)
    clf = make_model(config, cls=PaTHForSequenceClassification).train()
    ids, mask = padded_batch([random_ids(7, seed=95), random_ids(4, seed=96)], "right", 7)
    out = clf(input_ids=ids, attention_mask=mask, labels=torch.tensor([1, 0]))
    out.loss.backward()
    assert clf.score.weight.grad.abs().sum() > 0
    assert clf.model.layers[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_auto_classes():
    config = AutoConfig.for_model("path", **{**BASE, "num_labels": 4})
    assert type(config) is PaTHConfig
    assert config.num_kv_heads == 2 and config.use_qk_norm
    assert type(AutoModelForCausalLM.from_config(config)) is PaTHForCausalLM
    assert type(AutoModel.from_config(config)) is PaTHModel
    clf = AutoModelForSequenceClassification.from_config(PaTHConfig(**{**BASE, "num_labels": 4}))
    assert type(clf) is PaTHForSequenceClassification
    assert clf.score.out_features == 4


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_round_trip(tmp_path, tie):
    config = make_config(tie_word_embeddings=tie)
    model = make_model(config, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is PaTHForCausalLM
    if tie:
        assert loaded.lm_head.weight is loaded.model.embeddings.weight
    ids = random_ids(2, 7, seed=97)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# 6. Config
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(hidden_size=30, num_heads=4), "hidden_size"),
        (dict(hidden_size=32, num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(use_w_shortconv=True, conv_size=0), "conv_size"),
        (dict(hidden_act="not_an_activation"), "hidden_act"),
        (dict(attn_backend="cuda_magic"), "attn_backend"),
        (dict(attnres_block_size=4), "attnres_block_size"),
        (dict(elementwise_affine=False), "elementwise_affine"),
        (dict(cache_key_dtype="int8"), "cache_key_dtype"),
        (dict(attn_chunk_size=0), "attn_chunk_size"),
        (dict(attn_keep_preparation="yes"), "attn_keep_preparation"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PaTHConfig(**{**dict(hidden_size=32, num_heads=4, num_hidden_layers=1), **kwargs})


def test_config_accepts_conv_size_0_without_shortconv():
    config = PaTHConfig(hidden_size=32, num_heads=4, use_w_shortconv=False, conv_size=0)
    assert not config.use_w_shortconv


def test_config_aliases_read_and_write_through():
    config = PaTHConfig(hidden_size=32, num_heads=4, num_kv_heads=2, norm_eps=1e-5)
    assert (config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps) == (4, 2, 1e-5)
    config.num_attention_heads = 8
    config.num_key_value_heads = 4
    config.rms_norm_eps = 1e-4
    assert (config.num_heads, config.num_kv_heads, config.norm_eps) == (8, 4, 1e-4)
    assert config.head_dim == 4


def test_config_aliases_as_constructor_arguments():
    """Minimal failing case: transformers-style names given to the constructor must mean the same as the
    fla names. path_lm applies them (through super().__init__'s attribute_map) only AFTER it has resolved
    num_kv_heads from the default num_heads=32 and validated with that default."""
    config = PaTHConfig(hidden_size=64, num_attention_heads=4, rms_norm_eps=1e-5)
    assert (config.num_heads, config.norm_eps) == (4, 1e-5)
    assert config.num_kv_heads == 4  # None -> num_heads; path_lm leaves 32 (invalid: 4 % 32 != 0)
    config = PaTHConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)  # 48 % 32: spurious error
    assert (config.num_heads, config.num_kv_heads) == (4, 2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        PaTHConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=3)


def fla_intermediate_size(hidden_size, hidden_ratio=4):
    # fla's GatedMLP: intermediate_size = int(hidden_size * hidden_ratio * 2 / 3); 256 * ceil(that / 256)
    size = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * math.ceil(size / 256)


@pytest.mark.parametrize("hidden_size, ratio", [(64, 4), (100, 4), (384, 4), (768, 4), (1000, 3), (2048, 4), (96, 2.5)])
def test_default_intermediate_size_follows_fla(hidden_size, ratio):
    config = PaTHConfig(hidden_size=hidden_size, num_heads=4, hidden_ratio=ratio)
    assert config.intermediate_size == fla_intermediate_size(hidden_size, ratio)
    assert PaTHConfig(hidden_size=hidden_size, num_heads=4, intermediate_size=77).intermediate_size == 77


def test_defaults_equal_fla_config():
    fla_models = pytest.importorskip("fla.models")
    fla_cls = fla_models.PaTHAttentionConfig
    fla_params = inspect.signature(fla_cls.__init__).parameters
    our_params = inspect.signature(PaTHConfig.__init__).parameters
    shared = [n for n in fla_params if n in our_params and n not in ("self", "kwargs")]
    assert len(shared) >= 18, shared
    fla_config, ours = fla_cls(), PaTHConfig()
    for name in shared:
        theirs = getattr(fla_config, name)
        if name == "num_kv_heads" and theirs is None:
            theirs = fla_config.num_heads
        if name == "intermediate_size" and theirs is None:
            theirs = fla_intermediate_size(fla_config.hidden_size, fla_config.hidden_ratio)
        assert getattr(ours, name) == theirs, name
    # fields fla has and path_lm only accepts at their (only supported) default
    assert fla_config.attnres_block_size is None and fla_config.elementwise_affine is True
    # an fla config dict loads as the same architecture
    loaded = PaTHConfig(**{k: v for k, v in fla_config.to_dict().items() if k not in ("model_type", "transformers_version")})
    for name in shared:
        assert getattr(loaded, name) == getattr(ours, name), name


# ------------------------------------------------------------------------------------------------------------
# 7. The drop-in attention layer
# ------------------------------------------------------------------------------------------------------------

LAYER_CASES = {
    "brief": dict(hidden_size=64, num_heads=4, use_forget_gate=True, use_qk_norm=True, use_low_rank_w=True,
                  use_w_shortconv=True, conv_size=3, conv_bias=False),
    "gqa_fullrank_convbias": dict(hidden_size=64, num_heads=4, num_kv_heads=2, use_forget_gate=True,
                                  use_qk_norm=True, use_low_rank_w=False, use_w_shortconv=True, conv_size=4,
                                  conv_bias=True),
    "fla_defaults": dict(hidden_size=64, num_heads=4),
}


@pytest.mark.parametrize("case", list(LAYER_CASES), ids=list(LAYER_CASES))
def test_drop_in_layer_runs_and_matches_reference(case):
    kwargs = LAYER_CASES[case]
    torch.manual_seed(0)
    layer = PaTHAttention(**kwargs)
    x = torch.randn(2, 9, 64)
    out, attn, _ = layer(x)
    assert out.shape == (2, 9, 64) and attn is None
    randomize_(layer, seed=1)
    with torch.no_grad():
        out, _, _ = layer(x)
    weights = Weights(layer.state_dict())
    expected = reference_attention(
        weights, "", x,
        hidden_size=64,
        num_heads=kwargs["num_heads"],
        num_kv_heads=kwargs.get("num_kv_heads") or kwargs["num_heads"],
        use_forget_gate=kwargs.get("use_forget_gate", False),
        use_qk_norm=kwargs.get("use_qk_norm", False),
        use_low_rank_w=kwargs.get("use_low_rank_w", True),
        use_w_shortconv=kwargs.get("use_w_shortconv", True),
        conv_bias=kwargs.get("conv_bias", False),
    )
    assert weights.unused() == set()
    assert_close(out, expected, F32)


@pytest.mark.parametrize("case", list(LAYER_CASES), ids=list(LAYER_CASES))
def test_drop_in_layer_parameters_equal_fla(case):
    fla_layers = pytest.importorskip("fla.layers.path_attn")
    kwargs = LAYER_CASES[case]
    ours = PaTHAttention(**kwargs)
    theirs = fla_layers.PaTHAttention(**kwargs)
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == {
        n: tuple(p.shape) for n, p in theirs.named_parameters()
    }
    theirs.load_state_dict(ours.state_dict(), strict=True)
    # same constructor signature: every fla argument is accepted with the same default
    fla_sig = inspect.signature(fla_layers.PaTHAttention.__init__).parameters
    our_sig = inspect.signature(PaTHAttention.__init__).parameters
    for name, param in fla_sig.items():
        assert name in our_sig, name
        assert our_sig[name].default == param.default, name


def test_model_state_dict_equals_fla_model():
    """Checkpoints move both ways: same keys and shapes as fla's PaTHAttentionForCausalLM (fla's model has no
    qk norm and no conv bias, so those stay off here)."""
    fla_models = pytest.importorskip("fla.models")
    for low_rank in (True, False):
        kwargs = {k: v for k, v in BASE.items() if k not in ("use_qk_norm", "conv_size", "conv_bias",
                                                             "attn_chunk_size", "attn_backend")}
        kwargs["use_low_rank_w"] = low_rank
        ours = PaTHForCausalLM(PaTHConfig(**kwargs))
        theirs = fla_models.PaTHAttentionForCausalLM(fla_models.PaTHAttentionConfig(**kwargs))
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
            k: tuple(v.shape) for k, v in theirs.state_dict().items()
        }
        theirs.load_state_dict(ours.state_dict(), strict=True)
        ours.load_state_dict(theirs.state_dict(), strict=True)


def test_model_attention_blocks_match_reference_layer():
    """The model's config options reach each block's attention (GQA, gate, qk norm, conv, chunking)."""
    config = make_config()
    model = make_model(config, dtype=torch.float32)
    x = torch.randn(2, 10, config.hidden_size)
    weights = Weights(model.state_dict())
    for i, block in enumerate(model.model.layers):
        with torch.no_grad():
            out, _, _ = block.attn(x)
        expected = reference_attention(weights, f"model.layers.{i}.attn.", x, **attention_kwargs(config))
        assert_close(out, expected, F32, f"layer {i}:")


# ------------------------------------------------------------------------------------------------------------
# 8. Initialization
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "init_range, tie, low_rank", [(0.02, False, True), (0.05, True, False)], ids=["default_untied", "tied"]
)
def test_initialization(init_range, tie, low_rank):
    torch.manual_seed(0)
    config = PaTHConfig(
        vocab_size=512, hidden_size=256, num_hidden_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=512,
        use_forget_gate=True, use_qk_norm=True, use_w_shortconv=True, use_low_rank_w=low_rank, conv_bias=True,
        conv_size=4, initializer_range=init_range, tie_word_embeddings=tie,
    )
    model = PaTHForCausalLM(config)
    checked = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Embedding)):
            weight = module.weight.detach()
            assert abs(weight.std().item() - init_range) < 0.15 * init_range, (name, weight.std().item())
            assert abs(weight.mean().item()) < 0.1 * init_range, name
            checked.add(name)
            bias = getattr(module, "bias", None)
            if bias is not None:
                assert torch.count_nonzero(bias) == 0, f"{name}.bias is not zero"
                checked.add(name + ".bias")
        elif hasattr(module, "weight") and name.endswith("norm"):
            assert torch.equal(module.weight.detach(), torch.ones_like(module.weight)), name
            checked.add(name)
    attn = model.model.layers[0].attn
    for name in ("w_conv1d", "w_conv1d.bias", "bt_proj.bias", "g_proj.bias", "maybe_q_norm", "maybe_k_norm"):
        assert f"model.layers.0.attn.{name}" in checked, name
    assert "model.norm" in checked and "model.embeddings" in checked
    if tie:
        assert model.lm_head.weight is model.model.embeddings.weight
    else:
        assert "lm_head" in checked
    # zero biases: beta = 2 sigmoid(0) = 1 and the gate log sigmoid(0) = log 0.5 before the weights' small part
    torch.testing.assert_close(2 * torch.sigmoid(attn.bt_proj.bias), torch.ones(config.num_kv_heads))
    torch.testing.assert_close(F.logsigmoid(attn.g_proj.bias), torch.full((config.num_heads,), math.log(0.5)))


@pytest.mark.parametrize("low_rank_w, gate", [(True, True), (False, False)])
def test_joint_input_projection_equals_module_calls(monkeypatch, low_rank_w, gate):
    """Calls of several tokens run the attention layers' input projections as one product over their
    concatenated weights; a forward hook on one of them (as an adapter or an activation probe registers)
    sends the layer back to the module calls, which run the hook. Same logits, loss and every parameter
    gradient either way (float64)."""
    model = make_model(make_config(use_low_rank_w=low_rank_w, use_forget_gate=gate)).train()
    ids = random_ids(2, 13, seed=5)
    joint = []
    concatenated = path_lm.modeling_path._joint_weight
    monkeypatch.setattr(path_lm.modeling_path, "_joint_weight", lambda *a: joint.append(1) or concatenated(*a))
    results = []
    for hooked in (False, True):
        seen, joint[:] = [], []
        layers = model.model.layers if hooked else []
        handles = [layer.attn.k_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape)) for layer in layers]
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        for handle in handles:
            handle.remove()
        assert len(seen) == (model.config.num_hidden_layers if hooked else 0)
        assert len(joint) == (0 if hooked else model.config.num_hidden_layers)
    (logits, grads), (logits_hooked, grads_hooked) = results
    torch.testing.assert_close(logits, logits_hooked, atol=1e-12, rtol=1e-10)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_hooked[name], atol=1e-12, rtol=1e-10, msg=name)


def test_autocast_runs_the_layer_products_without_extra_casts():
    """Under autocast (bf16 here, on a CPU) the attention layer's joint input product concatenates the weights
    already cast, adds beta's and the gate's biases to their own columns, and hands the attention output to
    o_proj in bf16 (no round trip through float32). Logits and every gradient match the module calls, which a
    forward hook on k_proj forces, within bf16 rounding (O(1) random weights amplify it)."""
    model = make_model(make_config(use_forget_gate=True), dtype=torch.float32).train()
    ids = random_ids(2, 21, seed=7)
    o_inputs = []
    for layer in model.model.layers:
        layer.attn.o_proj.register_forward_pre_hook(lambda m, args: o_inputs.append(args[0].dtype))
    results = []
    for hooked in (False, True):
        handles = [layer.attn.k_proj.register_forward_hook(lambda *a: None) for layer in model.model.layers] if hooked else []
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        for handle in handles:
            handle.remove()
    assert o_inputs == [torch.bfloat16] * (2 * model.config.num_hidden_layers)
    (logits, grads), (logits_ref, grads_ref) = results
    assert (logits - logits_ref).norm() / logits_ref.norm() < 2e-2
    for name, grad in grads.items():
        # (beta's and the gate's bias gradients differ most, ~5 %: their logits are no longer rounded to bf16)
        assert (grad - grads_ref[name]).norm() / grads_ref[name].norm() < 0.1, name
