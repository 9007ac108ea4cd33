"""Loading a checkpoint for inference and streaming generated text: what ``path-lm generate`` and
``path-lm eval`` call."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """``"auto"``: the checkpoint's own dtype on CUDA, float32 on CPU (half precision is slow there)."""
    if dtype == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]


def load_model(model_path, device="auto", dtype="auto", trust_remote_code=True):
    """A causal LM from a folder or Hub id, on ``device``, in eval mode."""
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def load_model_and_tokenizer(model_path, tokenizer_path=None, device="auto", dtype="auto", trust_remote_code=True):
    """A causal LM (:func:`load_model`) and its tokenizer from a folder or Hub id."""
    model = load_model(model_path, device, dtype, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"no tokenizer could be loaded from {tokenizer_path or model_path} ({error}); pass --tokenizer DIR"
        ) from error
    return model, tokenizer


class FileStreamer(TextStreamer):
    """transformers' TextStreamer writing to any text stream (the terminal by default)."""

    def __init__(self, tokenizer, stream: IO[str] | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **decode_kwargs)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False):
        stream = self.stream or sys.stdout
        stream.write(text + ("\n" if stream_end else ""))
        stream.flush()


def generate_text(
    model, tokenizer, prompts: Iterable[str], stream: IO[str] | None = None, seed: int | None = None, **generate_kwargs
) -> list[str]:
    """Generate a continuation of each prompt in turn, streaming it to ``stream`` (stdout when None; pass
    ``stream=False`` for silence). Returns the continuations, decoded without special tokens.
    ``generate_kwargs`` go to ``model.generate`` (max_new_tokens, do_sample, temperature, top_k, top_p,
    num_beams, repetition_penalty, ...); beam search cannot stream, so its result is written when done."""
    from transformers import set_seed

    if seed is not None:
        set_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generate_kwargs.setdefault("pad_token_id", pad)
    beams = generate_kwargs.get("num_beams") or 1
    completions = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        if inputs["input_ids"].shape[1] == 0:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        streamer = FileStreamer(tokenizer, stream) if stream is not False and beams == 1 else None
        with torch.no_grad():
            output = model.generate(**inputs, streamer=streamer, **generate_kwargs)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        if stream is not False and streamer is None:
            (stream or sys.stdout).write(text + "\n")
        completions.append(text)
    return completions


__all__ = ["FileStreamer", "generate_text", "load_model", "load_model_and_tokenizer", "resolve_device", "resolve_dtype"]
