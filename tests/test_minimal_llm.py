"""Bringing MinimalLLM (the GPT-style model of hand-written PaTH training scripts) over to path_lm.

1. The config options that express it (plain MLP, embedding multiplier, torch's default RMSNorm eps,
   dropouts) against the independent float64 reference of tests/reference_model.py, extended here by those
   options, and torch.nn.RMSNorm itself.
2. Conversion: the original architecture is built below from its description in issue 8 (with path_lm's
   PaTHAttention as its attention, the drop-in for fla's), its state dict is saved the ways training scripts
   save it (plain, DDP `module.`, torch.compile `_orig_mod.`, nested, tied or untied head), converted, and the
   logits compared. Broken state dicts give a ValueError that names the key.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from reference_model import ACTIVATIONS, Weights, attention_kwargs, linear, reference_attention, rms_norm
from torch import nn
from transformers import AutoModelForCausalLM

from path_lm import PaTHAttention, PaTHConfig, PaTHForCausalLM
from path_lm.minimal_llm import convert_minimal_llm, load_state_dict_file, minimal_llm_to_path_lm
from path_lm.modeling_path import PaTHRMSNorm

VOCAB = 53
F32 = dict(rtol=1e-5, atol=1e-5)
F64 = dict(rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------------------
# The original architecture (issue 8): written from its description, sharing only PaTHAttention with path_lm
# ------------------------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """linear2(silu(linear1(x))); the scripts' linears have no bias."""

    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=False)
        self.linear2 = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.linear2(self.dropout(F.silu(self.linear1(x))))


class Attention(nn.Module):
    def __init__(self, d_model, n_heads, n_kv_heads=None, **path_options):
        super().__init__()
        self.path_attention = PaTHAttention(d_model, n_heads, n_kv_heads, attn_backend="torch", chunk_size=4,
                                            **path_options)

    def forward(self, x):
        return self.path_attention(x)[0]


class TransformerBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout, n_kv_heads=None, **path_options):
        super().__init__()
        self.attention = Attention(d_model, n_heads, n_kv_heads, **path_options)
        self.feed_forward = FeedForward(d_model, d_ff, dropout)
        self.norm1 = nn.RMSNorm(d_model)  # torch's default eps
        self.norm2 = nn.RMSNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.dropout(self.feed_forward(self.norm2(x)))


MINIMAL_PATH_OPTIONS = dict(use_forget_gate=True, use_qk_norm=True, use_low_rank_w=True, use_w_shortconv=True,
                            conv_size=3, conv_bias=False)


class MinimalLLM(nn.Module):
    def __init__(self, vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, d_ff=48, dropout=0.1, tie=True,
                 n_kv_heads=None, **path_options):
        super().__init__()
        self.d_model = d_model
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_dropout = nn.Dropout(dropout)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff, dropout, n_kv_heads, **{**MINIMAL_PATH_OPTIONS, **path_options})
            for _ in range(n_layers)
        )
        self.norm = nn.RMSNorm(d_model)
        self.output_dropout = nn.Dropout(dropout)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie:
            self.lm_head.weight = self.token_embedding.weight

    def forward(self, ids):
        x = self.position_dropout(self.token_embedding(ids) * math.sqrt(self.d_model))
        for block in self.transformer_blocks:
            x = block(x)
        return self.lm_head(self.output_dropout(self.norm(x)))


@torch.no_grad()
def randomize_(model, seed=0):
    """O(1) random weights everywhere (norm weights and biases included), so every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=gen)
        if name.endswith("bias"):
            p.copy_(0.7 * r)
        elif p.dim() == 1:
            p.copy_(1 + 0.3 * r)
        elif "embedding" in name:
            p.copy_(0.3 * r)
        elif "conv1d" in name:
            p.copy_(0.7 * r)
        else:
            p.copy_(r / math.sqrt(p.shape[1]))
    return model


def make_minimal(seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(MinimalLLM(**kwargs), seed).eval()


def random_ids(*shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------
# 1. The config options
# ------------------------------------------------------------------------------------------------------------

OPTIONS = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=40,
    use_forget_gate=True, use_qk_norm=True, conv_bias=True, attn_backend="torch", attn_chunk_size=4,
)


def reference_logits(state_dict, config, input_ids, scale=None):
    """float64 logits with the new options; `scale` multiplies the embedding / attention-output / MLP-output
    (where the dropouts act) by the given factors, to check the dropout places."""
    scale = {"embedding": 1.0, "attention": 1.0, "mlp": 1.0, **(scale or {})}
    weights = Weights(state_dict)
    eps = torch.finfo(torch.float64).eps if config.norm_eps is None else config.norm_eps
    act = ACTIVATIONS[config.hidden_act]
    x = weights("model.embeddings.weight")[input_ids] * (config.embedding_multiplier or 1.0) * scale["embedding"]
    for i in range(config.num_hidden_layers):
        lp = f"model.layers.{i}."
        a = reference_attention(weights, lp + "attn.", rms_norm(x, weights(lp + "attn_norm.weight"), eps),
                                **attention_kwargs(config))
        h = x + a * scale["attention"]
        m = rms_norm(h, weights(lp + "mlp_norm.weight"), eps)
        if config.mlp_type == "plain":
            inner = act(linear(m, weights(lp + "mlp.up_proj.weight")))
        else:
            inner = act(linear(m, weights(lp + "mlp.gate_proj.weight"))) * linear(m, weights(lp + "mlp.up_proj.weight"))
        x = h + linear(inner, weights(lp + "mlp.down_proj.weight")) * scale["mlp"]
    x = rms_norm(x, weights("model.norm.weight"), eps)
    head = weights("model.embeddings.weight") if config.tie_word_embeddings else weights("lm_head.weight")
    assert not weights.unused() - {"lm_head.weight"}, weights.unused()
    return x @ head.T


def options_model(dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    model = randomize_(PaTHForCausalLM(PaTHConfig(**{**OPTIONS, **overrides})))
    return model.to(dtype).eval()


OPTION_CASES = {
    "plain_mlp": dict(mlp_type="plain", hidden_act="silu"),
    "plain_mlp_gelu_multiplier_eps_none": dict(mlp_type="plain", hidden_act="gelu", embedding_multiplier=5.5,
                                               norm_eps=None),
    "gated_multiplier_tied": dict(embedding_multiplier=math.sqrt(32), tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", list(OPTION_CASES), ids=list(OPTION_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_options_match_reference(case, dtype):
    model = options_model(dtype, **OPTION_CASES[case])
    ids = random_ids(2, 9)
    with torch.no_grad():
        logits = model(ids).logits
    expected = reference_logits(model.state_dict(), model.config, ids)
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits.double(), expected, **tol)


def test_plain_mlp_parameters_and_default_width():
    config = PaTHConfig(hidden_size=64, num_heads=4, num_hidden_layers=1, mlp_type="plain")
    assert config.intermediate_size == 256  # hidden_size * hidden_ratio (4); no 2/3 rule without a gate
    names = {n for n, _ in PaTHForCausalLM(config).named_parameters() if ".mlp." in n}
    assert names == {"model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    gated = PaTHConfig(hidden_size=64, num_heads=4, num_hidden_layers=1)
    assert gated.mlp_type == "gated" and gated.intermediate_size == 256  # fla's rule, unchanged
    assert (gated.embedding_multiplier, gated.norm_eps) == (None, 1e-6)
    assert (gated.embedding_dropout, gated.attention_dropout, gated.hidden_dropout) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_norm_eps_none_equals_torch_rmsnorm(dtype):
    """torch adds the machine epsilon of its compute dtype (float32 for half inputs): tiny inputs show it."""
    gen = torch.Generator().manual_seed(0)
    ours, theirs = PaTHRMSNorm(16, eps=None).to(dtype), nn.RMSNorm(16).to(dtype)
    weight = (1 + 0.3 * torch.randn(16, generator=gen)).to(dtype)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    for magnitude in (1.0, 1e-3, 1e-4):
        x = (magnitude * torch.randn(3, 5, 16, generator=gen)).to(dtype)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_dropout_active_in_train_and_off_in_eval():
    ids = random_ids(2, 9)
    base = options_model(torch.float32, mlp_type="plain")
    for name in ("embedding_dropout", "attention_dropout", "hidden_dropout"):
        model = options_model(torch.float32, mlp_type="plain", **{name: 0.3})
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)  # eval: off
            model.train()
            torch.manual_seed(1)
            first = model(ids).logits
            second = model(ids).logits
        assert not torch.allclose(first, base(ids).logits), name
        assert not torch.allclose(first, second), name
    base.train()  # no dropout configured: train mode computes the eval logits
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, options_model(torch.float32, mlp_type="plain")(ids).logits)


@pytest.mark.parametrize("where, module", [("embedding", "model.embedding_dropout"),
                                           ("attention", "attn_dropout"), ("mlp", "mlp_dropout")])
def test_dropout_places(where, module):
    """Each dropout module sits where the config says: replacing it by a fixed scale matches the reference
    with that factor at that place."""
    name = {"embedding": "embedding_dropout", "attention": "attention_dropout", "mlp": "hidden_dropout"}[where]
    model = options_model(mlp_type="plain", embedding_multiplier=2.0, **{name: 0.5})

    class Scale(nn.Module):
        def forward(self, x):
            return 0.25 * x

    for full_name, sub in list(model.named_modules()):
        if isinstance(sub, nn.Dropout):
            assert sub.p == (0.5 if full_name.endswith(module) else 0.0), full_name
            if full_name.endswith(module):
                parent = model.get_submodule(full_name.rsplit(".", 1)[0])
                setattr(parent, full_name.rsplit(".", 1)[1], Scale())
    ids = random_ids(2, 9)
    with torch.no_grad():
        logits = model(ids).logits
    expected = reference_logits(model.state_dict(), model.config, ids, scale={where: 0.25})
    torch.testing.assert_close(logits, expected, **F64)


def test_new_options_save_and_load(tmp_path):
    model = options_model(torch.float32, mlp_type="plain", embedding_multiplier=3.0, norm_eps=None,
                          hidden_dropout=0.1, attention_dropout=0.2, embedding_dropout=0.05)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name in ("mlp_type", "embedding_multiplier", "norm_eps", "hidden_dropout", "attention_dropout",
                 "embedding_dropout"):
        assert getattr(loaded.config, name) == getattr(model.config, name), name
    ids = random_ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mlp_type="swiglu"), "mlp_type"),
        (dict(embedding_multiplier=0), "embedding_multiplier"),
        (dict(embedding_multiplier=float("inf")), "embedding_multiplier"),
        (dict(norm_eps=0), "norm_eps"),
        (dict(norm_eps="1e-6"), "norm_eps"),
        (dict(hidden_dropout=1.0), "hidden_dropout"),
        (dict(attention_dropout=-0.1), "attention_dropout"),
        (dict(embedding_dropout=None), "embedding_dropout"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_new_options_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PaTHConfig(hidden_size=32, num_heads=4, num_hidden_layers=1, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# 2. Conversion
# ------------------------------------------------------------------------------------------------------------


def saved_forms(state_dict):
    return {
        "plain": state_dict,
        "ddp": {"module." + k: v for k, v in state_dict.items()},
        "compiled": {"_orig_mod." + k: v for k, v in state_dict.items()},
        "compiled_ddp": {"module._orig_mod." + k: v for k, v in state_dict.items()},
        "nested": {"model_state_dict": state_dict, "step": torch.tensor(100), "epoch": 3},
    }


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("form", ["plain", "ddp", "compiled", "compiled_ddp", "nested"])
def test_conversion_same_logits(tmp_path, tie, form):
    original = make_minimal(tie=tie)
    path = tmp_path / "model.pt"
    torch.save(saved_forms(original.state_dict())[form], path)
    out = convert_minimal_llm(path, tmp_path / "converted")
    converted = PaTHForCausalLM.from_pretrained(out).eval()
    config = converted.config
    assert (config.mlp_type, config.hidden_act, config.norm_eps) == ("plain", "silu", None)
    assert config.embedding_multiplier == math.sqrt(32)
    assert (config.num_heads, config.num_kv_heads, config.num_hidden_layers, config.intermediate_size) == (4, 4, 2, 48)
    assert config.tie_word_embeddings is tie
    if tie:
        assert converted.lm_head.weight is converted.model.embeddings.weight
    assert (out / "modeling_path.py").is_file() and "auto_map" in (out / "config.json").read_text()
    ids = random_ids(3, 11)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids), **F32)


@pytest.mark.parametrize(
    "options",
    [
        dict(n_kv_heads=2, use_forget_gate=False, use_qk_norm=False),  # heads from k_proj / bt_proj alone
        dict(use_low_rank_w=False, conv_size=4, conv_bias=True),
        dict(use_w_shortconv=False),
    ],
    ids=["gqa_no_gate_no_qknorm", "fullrank_conv4_bias", "no_shortconv"],
)
def test_conversion_other_attention_options(options):
    original = make_minimal(tie=False, **options)
    converted = minimal_llm_to_path_lm(original.state_dict())
    ids = random_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids), **F32)


def test_conversion_keeps_bfloat16():
    original = make_minimal().to(torch.bfloat16)
    converted = minimal_llm_to_path_lm(original.state_dict())
    assert converted.dtype == torch.bfloat16
    for name, value in original.state_dict().items():
        if name == "token_embedding.weight":
            assert torch.equal(converted.model.embeddings.weight, value)


def test_conversion_dropout_option_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 3)} | {"<unk>": VOCAB - 3, "<s>": VOCAB - 2, "</s>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(tmp_path / "tok")
    path = tmp_path / "model.pt"
    torch.save(make_minimal().state_dict(), path)
    out = convert_minimal_llm(path, tmp_path / "converted", tokenizer=tmp_path / "tok", dropout=0.1)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (VOCAB - 2, VOCAB - 1)
    assert model.config.hidden_dropout == model.config.attention_dropout == model.config.embedding_dropout == 0.1
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("t1 t2 t3", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] <= ids.shape[1] + 3


def broken(state_dict, drop=(), reshape=None, add=None):
    sd = {k: v for k, v in state_dict.items() if k not in drop}
    if reshape:
        sd[reshape] = torch.zeros(*[s + 1 for s in sd[reshape].shape])
    if add:
        sd[add] = torch.zeros(3)
    return sd


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(drop=["token_embedding.weight"]), "token_embedding.weight"),
        (dict(drop=["transformer_blocks.1.feed_forward.linear2.weight"]),
         "transformer_blocks.1.feed_forward.linear2.weight"),
        (dict(drop=["transformer_blocks.1.attention.path_attention.g_proj.bias"]),
         "transformer_blocks.1.attention.path_attention.g_proj.bias"),
        (dict(drop=["norm.weight"]), "norm.weight"),
        (dict(reshape="transformer_blocks.1.norm2.weight"), "transformer_blocks.1.norm2.weight"),
        (dict(reshape="transformer_blocks.0.attention.path_attention.q_proj.weight"),
         "transformer_blocks.0.attention.path_attention.q_proj.weight"),
        (dict(reshape="lm_head.weight"), "lm_head.weight"),
        (dict(add="transformer_blocks.0.feed_forward.linear1.bias"), "transformer_blocks.0.feed_forward.linear1.bias"),
        (dict(add="module.extra.weight"), "extra.weight"),
    ],
    ids=["no_embedding", "no_linear2", "no_gate_bias_layer1", "no_final_norm", "norm_shape", "q_shape",
         "head_shape", "unexpected_bias", "unexpected_key"],
)
def test_bad_state_dicts_name_the_key(tmp_path, kwargs, key):
    sd = broken(make_minimal(tie=False).state_dict(), **kwargs)
    if "add" in kwargs and kwargs["add"].startswith("module."):
        sd = {"module." + k if not k.startswith("module.") else k: v for k, v in sd.items()}
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert_minimal_llm(tmp_path / "bad.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class NotAStateDict:
    pass


@pytest.mark.parametrize(
    "obj",
    [[torch.zeros(2)], {"model_state_dict": {"a": 1}, "config": "x"}, {"weights": torch.zeros(2), "lr": 0.1}],
    ids=["list", "nested_not_tensors", "mixed_dict"],
)
def test_not_a_state_dict(tmp_path, obj):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_state_dict_file(tmp_path / "x.pt")


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save({"model_state_dict": make_minimal().state_dict(), "config": NotAStateDict()}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict_file(tmp_path / "x.pt")


def test_convert_command_from_state_dict(tmp_path, capsys):
    from path_lm.cli import main

    original = make_minimal(tie=True)
    path = tmp_path / "model.pt"
    torch.save({"module." + k: v for k, v in original.state_dict().items()}, path)
    assert main(["convert", "--from-state-dict", str(path), "--layout", "minimal-llm", str(tmp_path / "out")]) in (0, None)
    converted = PaTHForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids), **F32)
