"""Train or fine-tune a PaTH language model on local text with ``transformers.Trainer``.

:func:`train` is what ``path-lm train`` runs; its pieces are separate functions that tests and scripts
call directly:

1. :func:`load_documents` reads documents from ``.txt`` files (one document per block of lines separated by
   a blank line), ``.jsonl`` files (one document per line, the text in ``text_field``), ``.parquet`` files
   (the ``text_field`` column) or a ``datasets`` dataset saved with ``save_to_disk`` (a folder; of a
   ``DatasetDict``, its ``train`` split);
2. :func:`train_bpe_tokenizer` trains a byte-level BPE on them with ``tokenizers`` unless a tokenizer
   folder is given;
3. :func:`pack_documents` tokenizes and packs the documents into rows of ``seq_len`` tokens whose
   ``position_ids`` restart at 0 at each document (PaTH models take a reset as a document boundary: no
   attention and no Householder product crosses it) and whose labels are -100 at each document's first
   token, so nothing is predicted across a boundary;
4. the model comes from a preset (:data:`PRESETS`), a config file or a checkpoint (fine-tuning);
5. ``transformers.Trainer`` trains it, with AdamW or (``optim="muon"``) Muon for the 2D hidden weights and
   AdamW for the rest (so ``torchrun`` / ``accelerate launch`` give DDP or FSDP unchanged),
   evaluates perplexity on held-out documents, checkpoints and resumes; :class:`LossCurveCallback` keeps
   ``loss_curve.png`` up to date;
6. the final model (with its remote code), the tokenizer and ``training_summary.json`` are written to a
   temporary sibling folder and renamed to ``OUTPUT_DIR/model``, so an interrupted save never leaves a
   half-written model there.

Bad input (missing files, no text, a tokenizer larger than the model's vocabulary, an output folder that
holds files) raises ``SystemExit`` with a message before anything is written.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import statistics
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from . import path_ops
from .configuration_path import PaTHConfig
from .modeling_path import PaTHForCausalLM

# Model shapes. 125m / 350m / 760m follow the PaTH paper's model sizes (GPT-style widths and depths); their
# vocab size is the tokenizer's. "tiny" is for tests and smoke runs on a CPU.
PRESETS = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "intermediate_size": 128},
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "num_heads": 12},
    "350m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_heads": 16},
    "760m": {"hidden_size": 1536, "num_hidden_layers": 24, "num_heads": 24},
}
TEXT_SUFFIXES = (".txt", ".text", ".md")
SPECIAL_TOKEN = "<|endoftext|>"  # bos, eos and pad of the trained tokenizer
# transformers 5.24 renamed TrainingArguments.gradient_checkpointing to activation_checkpointing (the old name
# is a deprecated alias there); 5.17 has only the old one.
CHECKPOINTING_FIELD = next(
    (f.name for f in dataclasses.fields(TrainingArguments) if f.name == "activation_checkpointing"),
    "gradient_checkpointing",
)
MODEL_DIRNAME = "model"
TOKENIZER_DIRNAME = "tokenizer"
SUMMARY_NAME = "training_summary.json"
PLOT_NAME = "loss_curve.png"
IGNORE_INDEX = -100
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def fail(message: str):
    """Stop with a message for the user and exit status 1 (what the CLI prints)."""
    raise SystemExit(f"path-lm train: error: {message}")


# ------------------------------------------------------------------------------------------------- data


def is_hub_id(name: str) -> bool:
    """Whether ``name`` (not an existing path) reads as a Hub repo id (``name`` or ``owner/name``) rather than a
    misspelt local path: no leading ``.`` ``/`` ``~``, at most one ``/``, and not ending in a data file suffix."""
    suffixes = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet")
    return bool(HUB_ID.fullmatch(name)) and not name.endswith(suffixes)


def load_documents(paths, text_field: str = "text", dataset_config: str | None = None,
                   max_documents: int | None = None) -> list[str]:
    """Documents (non-empty strings) from local files, saved ``datasets`` folders or Hub datasets, in order.

    ``.txt`` / ``.text`` / ``.md``: one document per block separated by blank lines. ``.jsonl`` / ``.json``
    (JSON lines): one document per line, from ``text_field``. ``.parquet``: the ``text_field`` column. A folder
    written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (its ``train`` split): ``text_field``.
    A name that is not a local path but a Hub dataset id (``owner/name``): ``text_field`` of its ``train`` split,
    loaded with ``datasets.load_dataset(id, dataset_config)``; with ``max_documents``, streamed and cut there.
    """
    documents = []
    for path in map(Path, paths):
        if not path.exists():
            if not is_hub_id(str(path)):
                fail(f"data file {str(path)!r} does not exist")
            texts = _load_hub_dataset(str(path), text_field, dataset_config, max_documents)
        elif path.is_dir():
            texts = _load_saved_dataset(path, text_field)
        elif path.suffix in TEXT_SUFFIXES:
            blocks, current = [], []
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    current.append(line)
                elif current:
                    blocks.append("\n".join(current))
                    current = []
            texts = blocks + (["\n".join(current)] if current else [])
        elif path.suffix in (".jsonl", ".json"):
            texts = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    fail(f"{path}:{number} is not JSON ({error.msg}); .jsonl files hold one JSON object per line")
                if not isinstance(record, dict) or text_field not in record:
                    fail(f"{path}:{number} has no {text_field!r} field; pick the field with --text-field")
                texts.append(record[text_field])
        elif path.suffix == ".parquet":
            import datasets

            texts = _text_column(datasets.Dataset.from_parquet(str(path)), text_field, path)
        else:
            fail(f"cannot read {str(path)!r}: use .txt, .jsonl, .parquet files or a folder saved with save_to_disk")
        documents.extend(t for t in texts if isinstance(t, str) and t.strip())
    if not documents:
        fail(f"no text found in {', '.join(map(str, paths))} (empty files or empty {text_field!r} fields)")
    return documents


def _load_hub_dataset(dataset_id: str, text_field: str, config: str | None, max_documents: int | None) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, config, split="train", streaming=max_documents is not None)
        if max_documents is not None:
            return [record[text_field] for record in dataset.take(max_documents)]
    except KeyError:
        fail(f"Hub dataset {dataset_id} has no {text_field!r} field; pick the field with --text-field")
    except (OSError, ValueError) as error:  # not found, offline, no train split, bad config name
        fail(f"{dataset_id!r} is not a local path and cannot be loaded as a Hub dataset: {error}")
    return _text_column(dataset, text_field, dataset_id)


def _load_saved_dataset(path: Path, text_field: str) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        fail(f"{str(path)!r} is a folder but not a dataset saved with save_to_disk")
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            fail(f"{path} holds splits {sorted(dataset)} and no 'train' split")
        dataset = dataset["train"]
    return _text_column(dataset, text_field, path)


def _text_column(dataset, text_field: str, path: Path) -> list[str]:
    if text_field not in dataset.column_names:
        fail(f"{path} has no {text_field!r} column (columns: {dataset.column_names}); pick one with --text-field")
    return list(dataset[text_field])


def split_documents(documents: list[str], eval_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold out ``eval_fraction`` of the documents (at least one when the fraction is > 0 and there are two
    or more), chosen with ``seed``; the rest keep their order."""
    if eval_fraction <= 0 or len(documents) < 2:
        return documents, []
    count = min(len(documents) - 1, max(1, round(eval_fraction * len(documents))))
    held_out = set(random.Random(seed).sample(range(len(documents)), count))
    train = [d for i, d in enumerate(documents) if i not in held_out]
    return train, [d for i, d in enumerate(documents) if i in held_out]


# -------------------------------------------------------------------------------------------- tokenizer


def train_bpe_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: any text encodes, no unknown tokens) trained on ``documents``, with
    ``<|endoftext|>`` as its bos, eos and pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        fail(f"--vocab-size {vocab_size} is too small for a byte-level BPE; use at least {len(alphabet) + 1}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SPECIAL_TOKEN], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN
    )


def load_tokenizer(path) -> PreTrainedTokenizerFast:
    """The tokenizer in a local folder, or of a Hub repo id (e.g. ``HuggingFaceTB/SmolLM-135M``)."""
    local = Path(path).exists()
    if not local and not is_hub_id(str(path)):
        fail(f"tokenizer folder {str(path)!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        where = "" if local else " (not a local folder; tried as a Hub id)"
        fail(f"cannot load a tokenizer from {str(path)!r}{where}: {error}")


# ------------------------------------------------------------------------------------------------ packing


def pack_documents(token_ids: list[list[int]], seq_len: int) -> list[dict[str, list[int]]]:
    """Pack tokenized documents, in order, into rows of exactly ``seq_len`` tokens.

    Each row has ``input_ids``, ``position_ids`` (0, 1, ... from each document's first token in the row; a
    document cut at a row's end continues at position 0 of the next row, as a new document) and ``labels``
    (the input ids, -100 at each document's first token: the model shifts labels, so nothing is predicted
    across a boundary). The last row is completed with single-token padding documents (id 0, label -100),
    which attend only to themselves.
    """
    rows, ids, positions = [], [], []
    for document in token_ids:
        start = 0
        while start < len(document):
            piece = document[start : start + seq_len - len(ids)]
            ids.extend(piece)
            positions.extend(range(len(piece)))
            start += len(piece)
            if len(ids) == seq_len:
                rows.append(_row(ids, positions))
                ids, positions = [], []
    if ids:
        padding = seq_len - len(ids)
        rows.append(_row(ids + [0] * padding, positions + [0] * padding))
    return rows


def _row(ids: list[int], positions: list[int]) -> dict[str, list[int]]:
    labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(ids, positions)]
    return {"input_ids": list(ids), "position_ids": list(positions), "labels": labels}


def tokenize_documents(tokenizer, documents: list[str]) -> list[list[int]]:
    """Token ids of each document, followed by the tokenizer's eos token when it has one (so the model
    learns where documents end)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    return [ids + eos for ids in encoded if ids]


class PackedDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: torch.tensor(value) for key, value in self.rows[index].items()}


# -------------------------------------------------------------------------------------------------- model


def build_model(tokenizer, preset: str | None = "tiny", config_file=None, from_checkpoint=None,
                attn_backend: str | None = None, keep_preparation: bool | None = None) -> PreTrainedModel:
    """A new model from ``preset`` or ``config_file`` (a PaTHConfig JSON) sized to the tokenizer, or the
    model of ``from_checkpoint``. ``attn_backend`` and ``keep_preparation`` (when not None) set its attention
    layers' kernel and kept preparation for this run only: the config, and so every checkpoint saved from the
    model, keeps the source's. Fails when the tokenizer has more tokens than a fixed vocab_size allows."""
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    if from_checkpoint is not None:
        if not Path(from_checkpoint).exists():
            fail(f"checkpoint {str(from_checkpoint)!r} does not exist")
        model = AutoModelForCausalLM.from_pretrained(str(from_checkpoint), trust_remote_code=True)
        source = f"checkpoint {from_checkpoint}"
    elif config_file is not None:
        if not Path(config_file).exists():
            fail(f"config file {str(config_file)!r} does not exist")
        try:
            values = json.loads(Path(config_file).read_text())
            values.pop("model_type", None)
            values.pop("auto_map", None)
            config = PaTHConfig(**{**special, **values})
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            fail(f"bad config file {config_file}: {error}")
        model = PaTHForCausalLM(config)
        source = f"config {config_file}"
    else:
        if preset not in PRESETS:
            fail(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or pass --config")
        config = PaTHConfig(vocab_size=len(tokenizer), **special, **PRESETS[preset])
        model = PaTHForCausalLM(config)
        source = f"preset {preset}"
    if len(tokenizer) > model.config.vocab_size:
        fail(
            f"the tokenizer has {len(tokenizer)} tokens but the model from {source} has vocab_size "
            f"{model.config.vocab_size}; use a smaller tokenizer (--vocab-size) or a model with a larger vocab_size"
        )
    run = {"attn_backend": attn_backend, "keep_preparation": keep_preparation}
    for module in model.modules():  # the attention layers (of path_lm's classes or a checkpoint's own code)
        if hasattr(module, "attn_backend"):
            for name, value in run.items():
                if value is not None:
                    setattr(module, name, value)
    return model


# ------------------------------------------------------------------------------------------ trainer parts


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def muon_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters Muon trains: the 2D weights inside the blocks (q/k/v/o, w_proj, bt_proj, g_proj
    and MLP projections). The embedding and the head (2D too, tied or not), norms, biases and the 3D short-conv
    weights are left to AdamW, as in the MinimalLLM recipe (``param.ndim == 2`` minus embedding and head)."""
    excluded = {id(module.weight) for module in (model.get_input_embeddings(), model.get_output_embeddings())
                if module is not None}
    return [n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and id(p) not in excluded]


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on some parameter groups and ``torch.optim.AdamW`` on the others, as one optimizer.

    ``param_groups`` is the two optimizers' groups (the same dicts), so a learning-rate scheduler scales both,
    each from its own peak rate; ``state_dict`` holds both optimizers' states, so checkpoints resume.
    """

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], *, muon_kwargs: dict, adamw_kwargs: dict):
        self.muon = torch.optim.Muon(muon_groups, **muon_kwargs)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw_kwargs)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={})
        self._link()

    def _link(self) -> None:
        # load_state_dict gives the inner optimizers new group dicts and state; point at them again.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.state = collections.ChainMap(self.muon.state, self.adamw.state)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._link()


class PaTHLMTrainer(Trainer):
    """``Trainer`` that logs ``eval_perplexity`` beside ``eval_loss`` and, given ``muon={"lr": ..., "momentum": ...}``,
    optimizes with :class:`MuonWithAdamW` (Muon for :func:`muon_parameter_names`, AdamW at ``args.learning_rate``
    for the rest; ``args.weight_decay`` for both, none on AdamW's norms and biases)."""

    def __init__(self, *args, muon: dict | None = None, tokens_per_step: int | None = None, **kwargs):
        self.muon = muon
        self.throughput = ThroughputMeter(tokens_per_step) if tokens_per_step else None
        super().__init__(*args, **kwargs)
        if self.throughput is not None:
            self.add_callback(self.throughput)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.muon is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        hidden = set(muon_parameter_names(model))
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        adamw_groups = [
            {"params": [p for n, p in named if n not in hidden and n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in hidden and n not in decay], "weight_decay": 0.0},
        ]
        _, adamw_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)  # lr, betas, eps of --optim adamw
        self.optimizer = MuonWithAdamW(
            [{"params": [p for n, p in named if n in hidden]}],
            [group for group in adamw_groups if group["params"]],
            muon_kwargs={"lr": self.muon["lr"], "momentum": self.muon["momentum"],
                         "weight_decay": self.args.weight_decay},
            adamw_kwargs=adamw_kwargs,
        )
        return self.optimizer

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        if "loss" in logs and self.throughput is not None:
            rate = self.throughput.rate(self.state.global_step)
            if rate is not None:
                logs["tokens_per_second"] = rate
        super().log(logs, *args, **kwargs)


class ThroughputMeter(TrainerCallback):
    """Training tokens per second (all processes together, padding included) between two training logs,
    for ``tokens_per_second`` in the log. Evaluations and checkpoint saves are not counted: the Trainer logs
    before it evaluates or saves at a step, and the clock restarts after them."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.mark = None  # (global step, time) the current interval started at

    def _restart(self, args, state, control, **kwargs):
        self.mark = (state.global_step, time.perf_counter())

    on_train_begin = on_evaluate = on_save = _restart

    def rate(self, step: int) -> float | None:
        now = time.perf_counter()
        previous, self.mark = self.mark, (step, now)
        if previous is None or step <= previous[0] or now <= previous[1]:
            return None
        return round((step - previous[0]) * self.tokens_per_step / (now - previous[1]), 1)


def plot_loss_curve(log_history: list[dict], path) -> None:
    """Training loss (and eval loss where logged) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    figure, axes = plt.subplots(figsize=(6, 4))
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats / token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class LossCurveCallback(TrainerCallback):
    """Redraws ``loss_curve.png`` in the output folder at every evaluation, checkpoint and at the end."""

    def _draw(self, args, state):
        if state.is_world_process_zero and state.log_history:
            plot_loss_curve(state.log_history, Path(args.output_dir) / PLOT_NAME)

    def on_evaluate(self, args, state, control, **kwargs):
        self._draw(args, state)

    def on_save(self, args, state, control, **kwargs):
        self._draw(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._draw(args, state)


# ------------------------------------------------------------------------------------------ output folder


def _our_outputs(output_dir: Path) -> list[Path]:
    names = {MODEL_DIRNAME, TOKENIZER_DIRNAME, SUMMARY_NAME, PLOT_NAME, "runs"}
    prefixes = ("checkpoint-", f".{MODEL_DIRNAME}.")
    return [p for p in output_dir.iterdir() if p.name in names or p.name.startswith(prefixes)]


def check_output_dir(output_dir: Path, overwrite: bool, resume: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        fail(f"output dir {str(output_dir)!r} is a file")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (overwrite or resume):
        fail(f"output dir {str(output_dir)!r} exists and is not empty; pass --overwrite to replace its results "
             f"or --resume to continue from its last checkpoint")


def save_final_model(trainer: Trainer, output_dir: Path, summary: dict) -> Path:
    """Save the model (with remote code), tokenizer, summary and loss curve to ``output_dir/model``: written
    to a temporary sibling folder first and renamed into place, so a failed save leaves no model folder."""
    final = output_dir / MODEL_DIRNAME
    # One name on every rank: DeepSpeed ZeRO-3 saves write from all ranks into the same folder.
    temporary = output_dir / f".{MODEL_DIRNAME}.tmp"
    if trainer.is_world_process_zero() and temporary.exists():
        shutil.rmtree(temporary)  # left by an interrupted save
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(temporary))  # every rank takes part (FSDP gathers, ZeRO-3 writes shards)
        trainer.accelerator.wait_for_everyone()  # every rank has written before the folder moves
        if trainer.is_world_process_zero():
            (temporary / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
            if (output_dir / PLOT_NAME).exists():
                shutil.copy2(output_dir / PLOT_NAME, temporary / PLOT_NAME)
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
    finally:
        if trainer.is_world_process_zero() and temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------- train


def train(
    data_files,
    output_dir,
    *,
    preset: str = "tiny",
    config_file=None,
    from_checkpoint=None,
    tokenizer=None,
    vocab_size: int = 8192,
    text_field: str = "text",
    dataset_config: str | None = None,
    max_documents: int | None = None,
    seq_len: int = 512,
    eval_fraction: float = 0.05,
    eval_files=None,
    overwrite: bool = False,
    resume: bool = False,
    batch_size: int = 8,
    eval_batch_size: int | None = None,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 3e-4,
    lr_scheduler_type: str = "cosine",
    warmup: float = 0.0,
    min_lr_ratio: float = 0.1,
    optim: str = "adamw",
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    max_steps: int = 1000,
    bf16: bool = False,
    gradient_checkpointing: bool = False,
    logging_steps: int = 10,
    eval_steps: int | None = None,
    save_steps: int = 500,
    save_total_limit: int | None = None,
    seed: int = 0,
    use_cpu: bool = False,
    disable_tqdm: bool | None = None,
    trainer_args: dict | None = None,
    attn_backend: str | None = None,
    keep_preparation: bool = False,
) -> dict:
    """Train (``preset`` / ``config_file``) or fine-tune (``from_checkpoint``) on ``data_files`` and save the
    model to ``output_dir/model``; returns the training summary (also in ``training_summary.json``).

    ``data_files`` / ``eval_files``: see :func:`load_documents` (local files or Hub dataset ids). ``tokenizer``: a
    tokenizer folder or Hub id; default the checkpoint's when fine-tuning, else a byte-level BPE of ``vocab_size``
    trained on the training documents. ``warmup``: steps, or a fraction of ``max_steps`` if < 1.
    ``lr_scheduler_type``: a transformers schedule; ``"cosine_with_min_lr"`` decays to ``min_lr_ratio`` of the
    peak (linear warmup, then cosine to the floor). ``optim``: ``"adamw"``, or ``"muon"`` for Muon (``muon_lr``,
    ``muon_momentum``) on the 2D hidden weights and AdamW (``learning_rate``) on the rest, see
    :class:`PaTHLMTrainer`. ``eval_steps``: default ``save_steps``; the eval set is ``eval_files`` or
    ``eval_fraction`` of the documents (0 turns evaluation off). ``trainer_args``: any other
    ``TrainingArguments`` fields. ``attn_backend`` (default: the model's) and ``keep_preparation`` choose the
    attention kernel and whether path-lm's kernel keeps its preparation for the backward, for this run only
    (see :func:`build_model`).
    """
    wall_start = time.perf_counter()
    output_dir = Path(output_dir)
    data_files = [str(p) for p in ([data_files] if isinstance(data_files, (str, os.PathLike)) else data_files)]
    if not data_files:
        fail("no data files given")
    check_output_dir(output_dir, overwrite, resume)
    if seq_len < 2:
        fail(f"--seq-len must be at least 2, got {seq_len}")
    if optim not in ("adamw", "muon"):
        fail(f"--optim must be adamw or muon, got {optim!r}")
    if not 0 <= min_lr_ratio <= 1:
        fail(f"--min-lr-ratio must be in [0, 1], got {min_lr_ratio}")
    if attn_backend in path_ops.KERNELS:
        if use_cpu or not torch.cuda.is_available():
            fail(f"--attn-backend {attn_backend} runs on a CUDA GPU only; use auto or torch here")
        problem = path_ops.kernel_import_error(attn_backend)
        if problem:
            fail(f"--attn-backend {attn_backend}: {problem}")

    # Data and tokenizer are read on every rank before any rank writes, so bad input stops all of them.
    documents = load_documents(data_files, text_field, dataset_config, max_documents)
    if eval_files:
        train_documents, eval_documents = documents, load_documents(eval_files, text_field, dataset_config,
                                                                    max_documents)
    else:
        train_documents, eval_documents = split_documents(documents, eval_fraction, seed)
    saved_tokenizer = output_dir / TOKENIZER_DIRNAME
    tokenizer_source = tokenizer
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif resume and saved_tokenizer.exists():
        tok, tokenizer_source = load_tokenizer(saved_tokenizer), str(saved_tokenizer)
    elif from_checkpoint is not None:
        if not (Path(from_checkpoint) / "tokenizer_config.json").exists():
            fail(f"checkpoint {from_checkpoint} has no tokenizer; pass --tokenizer DIR (the one it was trained with)")
        tok, tokenizer_source = load_tokenizer(from_checkpoint), str(from_checkpoint)
    else:
        tok = train_bpe_tokenizer(train_documents, vocab_size)
        tokenizer_source = f"byte-level BPE of {vocab_size} trained on the data"
    set_seed(seed)
    model = build_model(tok, preset, config_file, from_checkpoint, attn_backend, keep_preparation or None)
    model_source = (f"checkpoint {from_checkpoint}" if from_checkpoint else f"config {config_file}" if config_file
                    else f"preset {preset}")

    train_rows = pack_documents(tokenize_documents(tok, train_documents), seq_len)
    eval_rows = pack_documents(tokenize_documents(tok, eval_documents), seq_len) if eval_documents else []
    if not train_rows:
        fail("the training documents tokenize to no tokens")

    eval_steps = eval_steps or save_steps
    args = TrainingArguments(
        **{
            "output_dir": str(output_dir),
            "max_steps": max_steps,
            "per_device_train_batch_size": batch_size,
            "per_device_eval_batch_size": eval_batch_size or batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "learning_rate": learning_rate,
            "lr_scheduler_type": lr_scheduler_type,
            **({"lr_scheduler_kwargs": {"min_lr_rate": min_lr_ratio}} if lr_scheduler_type == "cosine_with_min_lr"
               else {}),
            "warmup_steps": warmup,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
            "bf16": bf16,
            CHECKPOINTING_FIELD: gradient_checkpointing,
            "logging_steps": logging_steps,
            "eval_strategy": "steps" if eval_rows else "no",
            "eval_steps": eval_steps,
            "save_strategy": "steps",
            "save_steps": save_steps,
            "save_total_limit": save_total_limit,
            "seed": seed,
            "use_cpu": use_cpu,
            "report_to": "none",
            "dataloader_num_workers": 0,
            "ddp_find_unused_parameters": False,  # every parameter takes part in every step
            "disable_tqdm": disable_tqdm,
            **(trainer_args or {}),
        }
    )
    if args.world_size > 1:
        # Every rank trained or loaded its own tokenizer (BPE training is deterministic); make sure they agree.
        digests = [None] * args.world_size
        digest = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            fail("the processes built different tokenizers; train one first and pass it with --tokenizer")
    # From here on the output folder is written (by the main process only).
    args.distributed_state.wait_for_everyone()
    if args.process_index == 0:
        if overwrite and output_dir.is_dir():
            for path in _our_outputs(output_dir):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        if not saved_tokenizer.exists() or overwrite:
            tok.save_pretrained(str(saved_tokenizer))
    args.distributed_state.wait_for_everyone()

    resume_from = None
    if resume:
        resume_from = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if resume_from is None and args.process_index == 0:
            print(f"path-lm train: no checkpoint in {output_dir}; starting from step 0")

    trainer = PaTHLMTrainer(
        model=model,
        args=args,
        train_dataset=PackedDataset(train_rows),
        eval_dataset=PackedDataset(eval_rows) if eval_rows else None,
        data_collator=default_data_collator,
        processing_class=tok,
        callbacks=[LossCurveCallback()],
        muon={"lr": muon_lr, "momentum": muon_momentum} if optim == "muon" else None,
        tokens_per_step=batch_size * gradient_accumulation_steps * args.world_size * seq_len,
    )
    result = trainer.train(resume_from_checkpoint=resume_from)
    # The last evaluation, unless the Trainer just ran it at the final step.
    last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last_eval is not None and last_eval["step"] == trainer.state.global_step:
        eval_metrics = last_eval
    else:
        eval_metrics = trainer.evaluate() if eval_rows else {}

    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    # Steady throughput: the median over the logging intervals after the first (which holds the warm-up:
    # kernel compilation, allocator growth); the first one if that is all there is.
    rates = [e["tokens_per_second"] for e in history if "tokens_per_second" in e]
    steady = statistics.median(rates[1:] or rates) if rates else None
    global_batch = batch_size * gradient_accumulation_steps * args.world_size
    summary = {
        "data_files": data_files,
        "eval_files": [str(p) for p in eval_files] if eval_files else None,
        "text_field": text_field,
        "documents": {"train": len(train_documents), "eval": len(eval_documents)},
        # Flat keys (data_files, tokens, steps, seq_len, final_loss, eval_loss, eval_perplexity) are what
        # path_lm.hub's model card reads.
        "tokens": trainer.state.global_step * global_batch * seq_len,  # training tokens seen, padding included
        "steps": trainer.state.global_step,
        "seq_len": seq_len,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_perplexity": perplexity(eval_metrics["eval_loss"]) if "eval_loss" in eval_metrics else None,
        "packed_tokens": {"train": len(train_rows) * seq_len, "eval": len(eval_rows) * seq_len},
        "tokenizer": {"source": tokenizer_source, "size": len(tok)},
        "model": {
            "source": model_source,
            "parameters": model.num_parameters(),
            "hidden_size": model.config.hidden_size,
            "num_hidden_layers": model.config.num_hidden_layers,
            "num_heads": model.config.num_heads,
            "vocab_size": model.config.vocab_size,
        },
        "training": {
            "global_batch_size": global_batch,
            "world_size": args.world_size,
            "learning_rate": learning_rate,
            "lr_scheduler_type": lr_scheduler_type,
            **({"min_lr_ratio": min_lr_ratio} if lr_scheduler_type == "cosine_with_min_lr" else {}),
            "optim": optim,
            **({"muon_lr": muon_lr, "muon_momentum": muon_momentum} if optim == "muon" else {}),
            "bf16": bf16,
            "seed": seed,
            "resumed_from": resume_from,
        },
        "mean_train_loss": result.training_loss,
        "loss_curve": [(e["step"], e["loss"]) for e in history if "loss" in e],
        "eval_curve": [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e],
        "throughput_curve": [(e["step"], e["tokens_per_second"]) for e in history if "tokens_per_second" in e],
        "tokens_per_second": steady,
        "tokens_per_second_per_device": steady / args.world_size if steady else None,
        "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated() / 2**30 if args.device.type == "cuda" else None),
        "wall_seconds": time.perf_counter() - wall_start,
    }
    if trainer.is_world_process_zero():  # the loss curve is already drawn (LossCurveCallback)
        (output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    final = save_final_model(trainer, output_dir, summary)
    if trainer.is_world_process_zero():
        ppl = summary["eval_perplexity"]
        loss = summary["final_loss"]  # None when no step logged a loss (--logging-steps > --max-steps)
        mean = summary["mean_train_loss"]
        metrics = f"final train loss {loss:.4f}" if loss is not None else f"mean train loss {mean:.4f}"
        if ppl:
            metrics += f", eval perplexity {ppl:.2f}"
        if steady:
            metrics += f", {steady:,.0f} tokens/s"
        print(f"path-lm train: saved {final} ({summary['steps']} steps, {metrics})")
    return summary


__all__ = [
    "PRESETS",
    "LossCurveCallback",
    "MuonWithAdamW",
    "PaTHLMTrainer",
    "PackedDataset",
    "build_model",
    "check_output_dir",
    "load_documents",
    "load_tokenizer",
    "muon_parameter_names",
    "pack_documents",
    "plot_loss_curve",
    "save_final_model",
    "split_documents",
    "tokenize_documents",
    "train",
    "train_bpe_tokenizer",
]
