"""Checkpoints: save_pretrained / from_pretrained round trips, Hub remote code, and fla checkpoints both ways.

Everything runs on CPU with tiny random models that switch every option on (forget gate, qk-norm, GQA, short
conv with bias, a small attention chunk so several blocks and a partial one are used). Weights are
re-randomized after construction (biases and norm weights included) so that a parameter loaded wrongly, or
left at its init, changes the logits.

Remote-code loads run in a subprocess in which neither ``path_lm`` nor ``fla`` can be imported (a user's machine
without them), with ``HF_HOME`` and ``HF_MODULES_CACHE`` in the test's tmp dir and the Hub offline.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports

import path_lm
from path_lm import PaTHConfig, PaTHForCausalLM

from reference_model import reference_causal_lm_logits

PACKAGE_DIR = Path(path_lm.__file__).resolve().parent
AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification")
SEQ_LEN = 11  # with attn_chunk_size=3: three full blocks and a partial one
VOCAB = 61


def tiny_config(**overrides) -> PaTHConfig:
    options = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=4,
        num_kv_heads=2,  # GQA
        intermediate_size=40,
        use_forget_gate=True,
        use_qk_norm=True,
        use_w_shortconv=True,
        use_low_rank_w=True,
        conv_size=3,
        conv_bias=True,
        attn_chunk_size=3,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,  # generate() always runs max_new_tokens
        pad_token_id=None,
    )
    options.update(overrides)
    return PaTHConfig(**options)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (biases and norm weights too) non-trivial random values."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            value = 1 + 0.2 * noise
        elif name.endswith("bias"):
            value = 0.5 * noise
        elif "embeddings" in name:
            value = noise
        else:
            value = noise * (0.4 / param.shape[-1] ** 0.5 if param.dim() > 1 and param.shape[-1] > 3 else 0.5)
        param.copy_(value.to(param.dtype))
    return model


def make_model(seed: int = 0, **overrides) -> PaTHForCausalLM:
    torch.manual_seed(seed)
    return randomize_(PaTHForCausalLM(tiny_config(**overrides)), seed).eval()


def input_ids(batch: int = 2, length: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def assert_same_state(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    a, b = loaded.state_dict(), original.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------------------
# 1. save_pretrained / from_pretrained round trips
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("low_rank", [True, False], ids=["lowrank_w", "full_w"])
def test_round_trip_float32(tmp_path, tie, low_rank):
    model = make_model(tie_word_embeddings=tie, use_low_rank_w=low_rank)
    if tie:
        assert model.lm_head.weight is model.model.embeddings.weight
    ids = input_ids()
    expected = logits_of(model, ids)
    model.save_pretrained(tmp_path)

    loaded, info = PaTHForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert loaded.config.tie_word_embeddings is tie
    assert (loaded.lm_head.weight is loaded.model.embeddings.weight) is tie
    assert_same_state(loaded, model)
    assert loaded.dtype == torch.float32
    assert torch.equal(logits_of(loaded, ids), expected)

    # The Auto classes find path_lm's registered classes (no remote code needed in-process).
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(auto) is PaTHForCausalLM
    assert torch.equal(logits_of(auto, ids), expected)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_bfloat16(tmp_path, tie):
    model = make_model(tie_word_embeddings=tie).to(torch.bfloat16)
    ids = input_ids()
    expected = logits_of(model, ids)
    assert expected.dtype == torch.bfloat16 and torch.isfinite(expected).all()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"

    loaded, info = PaTHForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert_same_state(loaded, model)
    assert torch.equal(logits_of(loaded, ids), expected)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_sharded(tmp_path, tie):
    model = make_model(tie_word_embeddings=tie)
    ids = input_ids()
    expected = logits_of(model, ids)
    model.save_pretrained(tmp_path, max_shard_size="20KB")

    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3, [p.name for p in tmp_path.iterdir()]
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    stored = set(index["weight_map"])
    expected_keys = set(model.state_dict()) - ({"lm_head.weight"} if tie else set())
    assert stored == expected_keys

    loaded, info = PaTHForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (loaded.lm_head.weight is loaded.model.embeddings.weight) is tie
    assert_same_state(loaded, model)
    assert torch.equal(logits_of(loaded, ids), expected)


# ---------------------------------------------------------------------------------------------------------
# 2. What a saved folder holds
# ---------------------------------------------------------------------------------------------------------


def relative_imports(source: str) -> set[str]:
    """Module names of `from .x import ...` statements (level 1) in a source file."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module, f"unexpected relative import {ast.unparse(node)}"
            names.add(node.module)
    return names


def test_saved_folder_has_code_files(tmp_path):
    make_model().save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.glob("*.py")}
    assert {"configuration_path.py", "modeling_path.py", "cache_path.py", "path_ops.py", "path_triton.py"} <= saved

    # Every relative import of every saved file (transitively) is in the folder, byte-identical to the package.
    for name in saved:
        source = (tmp_path / name).read_text()
        assert source == (PACKAGE_DIR / name).read_text(), f"{name} differs from the package source"
        for module in relative_imports(source):
            assert f"{module}.py" in saved, f"{name} imports .{module}, which was not saved"


def test_saved_code_needs_only_torch_and_transformers(tmp_path):
    """Loading a Hub checkpoint by remote code runs transformers' check_imports on the model file and on every
    relatively imported file, and refuses to load if a top-level package it finds is not installed. It reads
    imports anywhere in the file (function bodies included) except inside try blocks and `if is_x_available()`
    blocks, so an optional dependency such as fla must only be imported inside a try block."""
    make_model().save_pretrained(tmp_path)
    allowed = {"torch", "transformers"} | set(sys.stdlib_module_names)
    required = {path.name: sorted(set(get_imports(path)) - allowed) for path in sorted(tmp_path.glob("*.py"))}
    assert required == {name: [] for name in required}, required


def test_saved_config_auto_map(tmp_path):
    """config.json must map every Auto class, so that any of them loads the checkpoint by remote code."""
    make_model().save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text()).get("auto_map", {})
    expected = {
        "AutoConfig": "configuration_path.PaTHConfig",
        "AutoModel": "modeling_path.PaTHModel",
        "AutoModelForCausalLM": "modeling_path.PaTHForCausalLM",
        "AutoModelForSequenceClassification": "modeling_path.PaTHForSequenceClassification",
    }
    assert {key: auto_map.get(key) for key in AUTO_CLASSES} == expected, auto_map


@pytest.mark.parametrize("backend", ["fla", "triton", "torch"])
def test_cuda_only_kernel_choice_is_saved_as_auto(tmp_path, backend):
    """A model trained on a CUDA-only kernel loads and runs on a CPU; the running model keeps its choice."""
    model = make_model(attn_backend=backend)
    ids = input_ids()
    expected = logits_of(make_model(), ids)  # same weights, the default backend
    model.save_pretrained(tmp_path)
    assert model.config.attn_backend == backend
    assert all(layer.attn.attn_backend == backend for layer in model.model.layers)
    saved = json.loads((tmp_path / "config.json").read_text())["attn_backend"]
    assert saved == ("torch" if backend == "torch" else "auto")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits_of(loaded, ids), expected)
    chosen = AutoModelForCausalLM.from_pretrained(tmp_path, attn_backend="torch")
    assert {layer.attn.attn_backend for layer in chosen.model.layers} == {"torch"}


@pytest.mark.parametrize("keep", [True, False])
def test_kept_preparation_reaches_the_kernel_and_is_saved_as_default(tmp_path, monkeypatch, keep):
    """config.attn_keep_preparation reaches path-lm's kernel op on every layer's training pass (the op itself:
    test_kernels.py::test_kept_preparation_gives_the_recomputed_gradients); like the kernel choice it belongs
    to the machine, so save_pretrained writes the default (None) and from_pretrained can set it again."""
    from path_lm import path_ops

    seen = []

    def op(q, k, v, w, beta, g, **kwargs):  # the kernel's signature, computed by the exact path on a CPU
        seen.append(kwargs.pop("keep_preparation"))
        return path_ops.path_attention_torch(q, k, v, w, beta, g, **kwargs)

    monkeypatch.setitem(path_ops.KERNELS, "triton", lambda q, v: None)  # the kernel "can run" here
    monkeypatch.setattr(path_ops, "path_attention_triton", op)
    model = make_model(attn_backend="triton", attn_keep_preparation=keep).train()
    ids = input_ids()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert seen == [keep] * model.config.num_hidden_layers
    model.save_pretrained(tmp_path)
    assert model.config.attn_keep_preparation is keep
    assert json.loads((tmp_path / "config.json").read_text())["attn_keep_preparation"] is None
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_keep_preparation=keep)
    assert {layer.attn.keep_preparation for layer in loaded.model.layers} == {keep}
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.attn_keep_preparation is None


@pytest.mark.parametrize("field, value", [("attn_backend", "cuda_magic"), ("attn_keep_preparation", "yes"),
                                          ("cache_key_dtype", "int8"), ("beta_max", 3.0)])
def test_from_pretrained_checks_the_fields_it_is_given(tmp_path, field, value):
    """from_pretrained(..., field=value) sets config fields after the config's own checks: the model checks
    them again, so a bad value fails at load time with the config's message, not later or never."""
    make_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=field):
        AutoModelForCausalLM.from_pretrained(tmp_path, **{field: value})


# ---------------------------------------------------------------------------------------------------------
# 3, 4. Remote code in a process that cannot import path_lm
# ---------------------------------------------------------------------------------------------------------

CHILD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys

    # A machine on which neither path_lm nor fla is installed: every import finder is wrapped so that it
    # finds nothing for them (`import fla` raises "No module named 'fla'", importlib.util.find_spec gives None).
    BLOCKED = ("path_lm", "fla")

    class Hide:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.finder, attr)

    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
    for blocked in BLOCKED:
        assert blocked not in sys.modules and importlib.util.find_spec(blocked) is None, blocked
        try:
            __import__(blocked)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"{blocked} is importable in the child process")

    import torch
    import transformers

    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])
    data = torch.load(args["inputs"])
    result = {}
    for auto_name in args["auto_classes"]:
        auto_cls = getattr(transformers, auto_name)
        model = auto_cls.from_pretrained(args["source"], trust_remote_code=True).eval()
        module = sys.modules[type(model).__module__]
        entry = {"class": type(model).__name__, "module": type(model).__module__, "file": module.__file__}
        with torch.no_grad():
            if auto_name == "AutoModelForCausalLM":
                entry["logits"] = model(input_ids=data["input_ids"], use_cache=False).logits
                if args["generate"]:
                    entry["generated"] = model.generate(
                        data["prompt"], attention_mask=torch.ones_like(data["prompt"]),
                        max_new_tokens=5, do_sample=False,
                    )
            elif auto_name == "AutoModel":
                entry["hidden"] = model(input_ids=data["input_ids"], use_cache=False).last_hidden_state
            else:
                entry["logits"] = model(input_ids=data["input_ids"][:1]).logits  # no pad token: batch 1
        result[auto_name] = entry
    assert not [name for name in sys.modules if name.split(".")[0] in BLOCKED]
    torch.save(result, args["output"])
    """
)


def run_child(tmp_path: Path, source: str, data: dict, auto_classes=("AutoModelForCausalLM",), generate=False,
              extra_env=None) -> dict:
    work = tmp_path / "child"
    work.mkdir(exist_ok=True)
    torch.save(data, work / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "PYTHON"))}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    env.update(extra_env or {})
    args = dict(
        source=source,
        inputs=str(work / "inputs.pt"),
        output=str(work / "output.pt"),
        threads=torch.get_num_threads(),
        auto_classes=list(auto_classes),
        generate=generate,
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_SCRIPT, json.dumps(args)],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode:
        stderr = "\n".join(line if len(line) < 500 else line[:500] + " [...]" for line in proc.stderr.splitlines()[-40:])
        pytest.fail(f"child process failed (exit {proc.returncode}):\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{stderr}")
    return torch.load(work / "output.pt")


def check_remote_module(entry: dict, modules_cache: Path, class_name: str) -> None:
    assert entry["class"] == class_name
    assert entry["module"].startswith("transformers_modules."), entry["module"]
    assert entry["module"].endswith(".modeling_path"), entry["module"]
    assert Path(entry["file"]).resolve().is_relative_to(modules_cache.resolve()), entry["file"]


def test_remote_code_from_folder(tmp_path):
    model = make_model()
    ids, prompt = input_ids(), input_ids(batch=2, length=6, seed=3)
    expected = logits_of(model, ids)
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 11)
    folder = tmp_path / "tiny-path-ckpt"
    model.save_pretrained(folder)

    result = run_child(tmp_path, str(folder), {"input_ids": ids, "prompt": prompt}, generate=True)
    entry = result["AutoModelForCausalLM"]
    check_remote_module(entry, tmp_path / "hf_modules", "PaTHForCausalLM")
    assert torch.equal(entry["logits"], expected)
    assert torch.equal(entry["generated"], generated)


def test_remote_code_other_auto_classes(tmp_path):
    """AutoModel and AutoModelForSequenceClassification load the same checkpoint by remote code too."""
    model = make_model()
    ids = input_ids()
    with torch.no_grad():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    folder = tmp_path / "tiny-path-ckpt"
    model.save_pretrained(folder)

    result = run_child(tmp_path, str(folder), {"input_ids": ids},
                       auto_classes=("AutoModel", "AutoModelForSequenceClassification"))
    check_remote_module(result["AutoModel"], tmp_path / "hf_modules", "PaTHModel")
    assert torch.equal(result["AutoModel"]["hidden"], hidden)
    entry = result["AutoModelForSequenceClassification"]
    check_remote_module(entry, tmp_path / "hf_modules", "PaTHForSequenceClassification")
    assert entry["logits"].shape == (1, 2)  # num_labels defaults to 2; the score head is newly initialized


def build_hub_cache(hub_cache: Path, repo_id: str, folder: Path, commit: str) -> Path:
    """Lay out `folder` as the Hub cache would after downloading `repo_id` at `commit`."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        try:
            os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
        except OSError:  # no symlinks on this filesystem: the Hub client copies in that case too
            shutil.copyfile(blob, snapshot / path.name)
    return snapshot


def test_remote_code_from_offline_hub_cache(tmp_path):
    model = make_model(seed=5)
    ids, prompt = input_ids(), input_ids(batch=1, length=4, seed=7)
    expected = logits_of(model, ids)
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
    folder = tmp_path / "saved"
    model.save_pretrained(folder, max_shard_size="20KB")  # the sharded layout through the Hub cache too
    commit = hashlib.sha1(b"tiny-path").hexdigest()
    hub_cache = tmp_path / "hub"
    build_hub_cache(hub_cache, "someuser/tiny-path", folder, commit)

    result = run_child(
        tmp_path, "someuser/tiny-path", {"input_ids": ids, "prompt": prompt}, generate=True,
        extra_env={"HF_HUB_CACHE": str(hub_cache)},
    )
    entry = result["AutoModelForCausalLM"]
    check_remote_module(entry, tmp_path / "hf_modules", "PaTHForCausalLM")
    assert "someuser" in entry["module"] and commit in entry["module"], entry["module"]
    assert torch.equal(entry["logits"], expected)
    assert torch.equal(entry["generated"], generated)


# ---------------------------------------------------------------------------------------------------------
# 5. fla checkpoints
# ---------------------------------------------------------------------------------------------------------


def fla_models():
    return pytest.importorskip("fla.models")


FLA_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads", "hidden_ratio", "hidden_act",
    "norm_eps", "initializer_range", "tie_word_embeddings", "use_forget_gate", "use_w_shortconv", "use_low_rank_w",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
)


@pytest.mark.parametrize("low_rank", [True, False], ids=["lowrank_w", "full_w"])
def test_fla_checkpoint_loads(tmp_path, low_rank):
    fla = fla_models()
    fla_config = fla.PaTHAttentionConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=2, hidden_ratio=2,
        intermediate_size=None if low_rank else 40,  # None: fla's rounding rule (-> 256)
        use_forget_gate=True, use_low_rank_w=low_rank, tie_word_embeddings=False,
        norm_eps=1e-5, bos_token_id=3, eos_token_id=4,  # not the defaults, so the values must travel
    )
    torch.manual_seed(0)
    fla_model = randomize_(fla.PaTHAttentionForCausalLM(fla_config), seed=3)
    fla_state = {k: v.clone() for k, v in fla_model.state_dict().items()}
    fla_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "path_attn" and "fuse_norm" in saved and "fuse_swiglu" in saved

    model, info = PaTHForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = model.state_dict()
    assert state.keys() == fla_state.keys()
    for key, value in fla_state.items():
        assert torch.equal(state[key], value), key

    config = model.config
    for field in FLA_FIELDS:
        assert getattr(config, field) == saved[field], field
    assert config.intermediate_size == fla_model.model.layers[0].mlp.intermediate_size
    assert config.num_kv_heads == 2 and config.head_dim == 8
    assert (config.use_qk_norm, config.conv_size, config.conv_bias) == (False, 3, False)  # fla's layer defaults

    # Independent float64 forward from fla's weights and config.json (fla's layer has no qk-norm, no conv bias).
    ids = input_ids(batch=1, length=9)
    ref_config = SimpleNamespace(**{**saved, "use_qk_norm": False, "conv_bias": False})
    ref, used = reference_causal_lm_logits(fla_state, ref_config, input_ids=ids, return_weights=True)
    assert not used.unused(), f"checkpoint tensors the reference never read: {sorted(used.unused())}"
    torch.testing.assert_close(logits_of(model, ids).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("low_rank", [True, False], ids=["lowrank_w", "full_w"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_path_lm_checkpoint_loads_into_fla(tmp_path, low_rank, tie):
    fla = fla_models()
    # What fla's model can express: no qk-norm, no conv bias, conv_size 3.
    model = make_model(use_low_rank_w=low_rank, tie_word_embeddings=tie, use_qk_norm=False, conv_bias=False)
    c = model.config
    fla_config = fla.PaTHAttentionConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, intermediate_size=c.intermediate_size,
        hidden_act=c.hidden_act, norm_eps=c.norm_eps, use_forget_gate=c.use_forget_gate,
        use_w_shortconv=c.use_w_shortconv, use_low_rank_w=c.use_low_rank_w, tie_word_embeddings=tie,
    )
    fla_model = fla.PaTHAttentionForCausalLM(fla_config)
    result = fla_model.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    fla_state = fla_model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(fla_state[key], value), key

    # And from the saved safetensors, through fla's own from_pretrained.
    model.save_pretrained(tmp_path)
    loaded, info = fla.PaTHAttentionForCausalLM.from_pretrained(tmp_path, config=fla_config, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    loaded_state = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded_state[key], value), key
