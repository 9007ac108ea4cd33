"""Generation tests of path_lm on CPU: incremental decoding against the full forward, generate() modes
(greedy, beam search, sampling, left padding, streamers, continuing from a returned cache), the refusal
of assisted / prompt-lookup decoding, bf16 drift of the cached keys, and in-place cache buffers.

Every model here is tiny and random with all options on (forget gate, qk-norm, GQA, short conv) and
``attn_chunk_size=8`` so that prompts span several blocks. ``initializer_range=0.2`` keeps the logits
far from flat, so greedy / beam choices are not decided by rounding noise.

Works with transformers versions that pass the cache as ``cache=`` (>= 5.24) and as ``past_key_values=``.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import transformers
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPast

from path_lm import PaTHCache, PaTHCacheLayer, PaTHConfig, PaTHForCausalLM, PaTHStaticCache, cache_path

# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`.
CACHE_KW = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

VOCAB = 64
PAD, BOS, EOS = 0, 1, 2
FIRST_WORD = 3  # prompts use ids FIRST_WORD .. VOCAB - 1 (no special tokens)
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning makes
    them 100x slower; restore the setting afterwards for other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_config(**overrides) -> PaTHConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        use_forget_gate=True,
        use_qk_norm=True,
        use_w_shortconv=True,
        conv_size=3,
        attn_chunk_size=8,
        initializer_range=0.2,
        attn_backend="torch",
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    kwargs.update(overrides)
    return PaTHConfig(**kwargs)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PaTHForCausalLM:
    torch.manual_seed(seed)
    model = PaTHForCausalLM(make_config(**overrides)).to(dtype).eval()
    # No generation defaults from the hub / config that could change decoding behind the test's back.
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = BOS
    return model


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_WORD, VOCAB, (batch, length), generator=gen)


def cache_of(output):
    return getattr(output, CACHE_KW)


@pytest.fixture(scope="module")
def model():
    return make_model(seed=0)


# ---------------------------------------------------------------------------------------------------------
# 1. Incremental decoding reproduces the full forward
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_cache_kwarg_name_matches_transformers_version():
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert CACHE_KW == ("cache" if major_minor >= (5, 24) else "past_key_values")


@torch.no_grad()
@pytest.mark.parametrize("user_cache", [False, True], ids=["model_made_cache", "user_PaTHCache"])
def test_stepwise_decoding_matches_full_forward(model, user_cache):
    """Prefill 21 tokens (three blocks of 8), then single steps, a 5-token chunk, more single steps, an
    11-token chunk (crossing block boundaries) and final single steps; every logit equals one full forward."""
    B, T = 2, 21 + 4 + 5 + 3 + 11 + 4
    ids = random_ids(B, T, seed=1)
    full = model(ids, use_cache=False).logits

    schedule = [21, 1, 1, 1, 1, 5, 1, 1, 1, 11, 1, 1, 1, 1]
    assert sum(schedule) == T
    cache = PaTHCache(model.config) if user_cache else None
    pieces, pos = [], 0
    for n in schedule:
        kwargs = {CACHE_KW: cache} if cache is not None else {}
        out = model(ids[:, pos : pos + n], use_cache=True, **kwargs)
        returned = cache_of(out)
        assert isinstance(returned, PaTHCache)
        if cache is not None:
            assert returned is cache, "the cache passed in must be the object returned (filled in place)"
        cache = returned
        pos += n
        assert cache.get_seq_length() == pos
        assert all(layer.get_seq_length() == pos for layer in cache.layers)
        pieces.append(out.logits)
    step = torch.cat(pieces, dim=1)
    assert step.shape == full.shape
    torch.testing.assert_close(step, full, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_forget_gate=False, use_qk_norm=False, num_kv_heads=None, use_w_shortconv=False),
        dict(use_low_rank_w=False, conv_size=4, conv_bias=True, attn_chunk_size=5),
    ],
    ids=["options_off", "full_rank_w_conv4_chunk5"],
)
def test_stepwise_decoding_other_configs(overrides):
    model = make_model(seed=1, **overrides)
    ids = random_ids(2, 30, seed=12)
    full = model(ids, use_cache=False).logits
    cache = PaTHCache(model.config)
    pieces, pos = [], 0
    for n in [13, 1, 1, 7, 1, 1, 6]:
        pieces.append(model(ids[:, pos : pos + n], use_cache=True, **{CACHE_KW: cache}).logits)
        pos += n
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_reset_then_reuse(model):
    ids = random_ids(1, 12, seed=13)
    cache = PaTHCache(model.config)
    model(random_ids(1, 9, seed=14), use_cache=True, **{CACHE_KW: cache})
    cache.reset()
    assert cache.get_seq_length() == 0
    a = model(ids[:, :10], use_cache=True, **{CACHE_KW: cache}).logits
    b = model(ids[:, 10:], use_cache=True, **{CACHE_KW: cache}).logits
    torch.testing.assert_close(torch.cat([a, b], 1), model(ids, use_cache=False).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_filled_standard_cache_refused(model):
    from transformers import DynamicCache

    ids = random_ids(1, 6, seed=15)
    empty = DynamicCache()
    out = model(ids, use_cache=True, **{CACHE_KW: empty})
    assert isinstance(cache_of(out), PaTHCache)  # an empty standard cache is swapped for a PaTH cache
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    with pytest.raises(TypeError, match="PaTHCache"):
        model(ids, use_cache=True, **{CACHE_KW: filled})


@torch.no_grad()
def test_decoding_with_past_key_values_kwarg_also_accepted(model):
    """The model forward accepts both spellings regardless of the transformers version."""
    ids = random_ids(1, 14, seed=2)
    full = model(ids, use_cache=False).logits
    for kw in ("cache", "past_key_values"):
        cache = PaTHCache(model.config)
        a = model(ids[:, :10], use_cache=True, **{kw: cache}).logits
        b = model(ids[:, 10:11], use_cache=True, **{kw: cache}).logits
        c = model(ids[:, 11:], use_cache=True, **{kw: cache}).logits
        assert cache.get_seq_length() == 14
        torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# 2. generate(): greedy, beam search, sampling
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_greedy_with_and_without_cache_identical(model):
    ids = random_ids(2, 13, seed=3)
    with_cache = model.generate(ids, max_new_tokens=24, do_sample=False)
    without = model.generate(ids, max_new_tokens=24, do_sample=False, use_cache=False)
    assert with_cache.shape[1] > ids.shape[1]
    assert torch.equal(with_cache, without)


@torch.no_grad()
def test_greedy_logits_with_and_without_cache_match(model):
    ids = random_ids(2, 13, seed=4)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    a = model.generate(ids, **kwargs)
    b = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=ATOL, rtol=0)
    # and the generated tokens' logits equal one full forward of the final sequence
    full = model(a.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(a.logits, 1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_beam_search_with_and_without_cache_identical(model, monkeypatch):
    ids = random_ids(2, 11, seed=5)
    kwargs = dict(
        max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False,
        return_dict_in_generate=True, output_scores=True,
    )
    reorders = []
    original = PaTHCacheLayer.reorder_cache

    def recording_reorder(self, beam_idx):
        reorders.append(beam_idx.clone())
        return original(self, beam_idx)

    monkeypatch.setattr(PaTHCacheLayer, "reorder_cache", recording_reorder)
    a = model.generate(ids, **kwargs)
    monkeypatch.undo()
    # the cache really was reordered, with beams switching parents (not only identity permutations)
    assert reorders and any(not torch.equal(idx, torch.arange(idx.numel())) for idx in reorders)
    b = model.generate(ids, use_cache=False, **kwargs)
    assert a.sequences.shape[0] == 4
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, atol=1e-5, rtol=0)


@torch.no_grad()
def test_beam_search_matches_brute_force_scores(model):
    """The best beam's score equals the full-forward log-probability of its sequence (length_penalty=0)."""
    ids = random_ids(1, 9, seed=6)
    out = model.generate(
        ids, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False, length_penalty=0.0,
        return_dict_in_generate=True, output_scores=True,
    )
    seq = out.sequences[:1]
    logprobs = torch.log_softmax(model(seq, use_cache=False).logits[0, ids.shape[1] - 1 : -1].double(), -1)
    total = logprobs.gather(-1, seq[0, ids.shape[1] :, None]).sum()
    torch.testing.assert_close(out.sequences_scores[0].double(), total, atol=1e-4, rtol=0)


@torch.no_grad()
def test_sampling_reproducible_and_equal_with_and_without_cache(model):
    ids = random_ids(2, 7, seed=7)
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    torch.manual_seed(123)
    a = model.generate(ids, **kwargs)
    torch.manual_seed(123)
    b = model.generate(ids, **kwargs)
    torch.manual_seed(123)
    c = model.generate(ids, use_cache=False, **kwargs)
    torch.manual_seed(124)
    d = model.generate(ids, **kwargs)
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    assert not torch.equal(a, d), "a different seed should sample differently"


@torch.no_grad()
@pytest.mark.parametrize(
    "options",
    [dict(top_k=5), dict(top_p=0.8), dict(temperature=0.5), dict(top_k=10, top_p=0.9, temperature=1.3)],
    ids=["top_k", "top_p", "temperature", "combined"],
)
def test_sampling_options_run(model, options):
    ids = random_ids(2, 6, seed=8)
    torch.manual_seed(0)
    a = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=True, **options)
    torch.manual_seed(0)
    b = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=True, use_cache=False, **options)
    assert a.shape == (2, 14)
    assert torch.equal(a[:, :6], ids)
    assert ((a >= 0) & (a < VOCAB)).all()
    assert torch.equal(a, b)


@torch.no_grad()
def test_top_k_1_sampling_equals_greedy(model):
    ids = random_ids(2, 9, seed=9)
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=True, top_k=1)
    greedy = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(sampled, greedy)


@torch.no_grad()
def test_sampling_num_return_sequences(model):
    ids = random_ids(2, 5, seed=10)
    torch.manual_seed(1)
    out = model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=True, num_return_sequences=3)
    assert out.shape == (6, 14)
    # rows are grouped per prompt: 3 samples of prompt 0, then 3 of prompt 1
    assert torch.equal(out[:3, :5], ids[:1].expand(3, -1))
    assert torch.equal(out[3:, :5], ids[1:].expand(3, -1))
    torch.manual_seed(1)
    again = model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=True, num_return_sequences=3, use_cache=False)
    assert torch.equal(out, again)


@torch.no_grad()
def test_long_generation_from_short_prompt(model):
    """Prompt of 3 tokens, 100 new ones (far past the prompt, many blocks of 8): identical with/without cache."""
    ids = random_ids(1, 3, seed=11)
    kwargs = dict(max_new_tokens=100, min_new_tokens=100, do_sample=False, return_dict_in_generate=True, output_logits=True)
    a = model.generate(ids, **kwargs)
    b = model.generate(ids, use_cache=False, **kwargs)
    assert a.sequences.shape == (1, 103)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# 3. Left-padded batches
# ---------------------------------------------------------------------------------------------------------


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - p.numel() :] = p
        mask[i, L - p.numel() :] = 1
    return ids, mask


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_each_prompt_alone(model, use_cache):
    lengths = [1, 9, 19, 2, 13]
    prompts = [random_ids(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(prompts)
    assert (mask == 0).any(1).sum() == 4
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    batch = model.generate(ids, attention_mask=mask, pad_token_id=PAD, use_cache=use_cache, **kwargs)
    L = ids.shape[1]
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long), **kwargs)
        assert torch.equal(batch.sequences[i, L:], alone.sequences[0, prompt.numel() :]), f"prompt {i} (length {prompt.numel()})"
        torch.testing.assert_close(
            torch.stack([step[i] for step in batch.logits]), torch.stack([step[0] for step in alone.logits]), atol=1e-4, rtol=0
        )


@torch.no_grad()
def test_left_padded_prefill_then_chunk_and_steps(model):
    """Model level: a left-padded prefill, then a 5-token chunk and single steps (attention_mask growing
    with the cache); every row's logits equal the full forward of that row alone, without padding."""
    prompts = [random_ids(1, n, seed=40 + n)[0] for n in (1, 6, 19)]
    ids, mask = left_pad(prompts)
    L = ids.shape[1]
    cont = random_ids(3, 12, seed=45)
    full_mask = torch.cat([mask, torch.ones(3, 12, dtype=torch.long)], 1)
    cache = PaTHCache(model.config)
    outs = [model(ids, attention_mask=mask, use_cache=True, **{CACHE_KW: cache}).logits[:, -1:]]
    outs.append(model(cont[:, :5], attention_mask=full_mask[:, : L + 5], use_cache=True, **{CACHE_KW: cache}).logits)
    for t in range(5, 12):
        outs.append(model(cont[:, t : t + 1], attention_mask=full_mask[:, : L + t + 1], use_cache=True, **{CACHE_KW: cache}).logits)
    got = torch.cat(outs, 1)
    for i, prompt in enumerate(prompts):
        alone = model(torch.cat([prompt, cont[i]])[None], use_cache=False).logits[0, prompt.numel() - 1 :]
        torch.testing.assert_close(got[i], alone, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [4, 8])
def test_chunked_prefill_generation(model, chunk):
    """generate(prefill_chunk_size=...) feeds the (left-padded) prompt in pieces through the cache."""
    prompts = [random_ids(1, n, seed=50 + n)[0] for n in (1, 6, 19)]
    ids, mask = left_pad(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(ids, prefill_chunk_size=chunk, **kwargs), model.generate(ids, **kwargs))


@torch.no_grad()
def test_generate_from_inputs_embeds(model):
    ids = random_ids(2, 9, seed=55)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    from_ids = model.generate(ids, **kwargs)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), **kwargs)
    assert torch.equal(from_embeds, from_ids[:, 9:])


@torch.no_grad()
def test_left_padded_beam_search_equals_alone(model):
    prompts = [random_ids(1, n, seed=30 + n)[0] for n in (4, 12)]
    ids, mask = left_pad(prompts)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False)
    batch = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kwargs)
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **kwargs)
        assert torch.equal(batch[i, ids.shape[1] :], alone[0, prompt.numel() :])


# ---------------------------------------------------------------------------------------------------------
# 4. Streamers
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the model's vocabulary, built offline: id i <-> "w{i}"."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["<pad>"], vocab["<s>"], vocab["</s>"] = PAD, BOS, EOS
    del vocab[f"w{PAD}"], vocab[f"w{BOS}"], vocab[f"w{EOS}"]
    backend = tokenizers.Tokenizer(WordLevel(vocab=vocab, unk_token="w3"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    assert len(tok) == VOCAB
    assert tok.decode([5, 6, 7]) == "w5 w6 w7"
    return tok


@torch.no_grad()
def test_text_iterator_streamer_receives_every_token(model, tokenizer):
    from transformers import TextIteratorStreamer

    ids = random_ids(1, 7, seed=40)
    torch.manual_seed(0)
    expected = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=True, top_k=20)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    errors = []

    def run():
        try:
            torch.manual_seed(0)
            with torch.no_grad():
                model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=True, top_k=20, streamer=streamer)
        except Exception as err:  # surfaced below; the streamer would otherwise wait for its timeout
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run)
    thread.start()
    text = "".join(chunk for chunk in streamer)
    thread.join()
    assert not errors, errors
    assert text == tokenizer.decode(expected[0, 7:])
    assert len(text.split()) == 30


@torch.no_grad()
def test_text_streamer_prints_generated_text(model, tokenizer, capsys):
    from transformers import TextStreamer

    ids = random_ids(1, 10, seed=41)
    out = model.generate(ids, max_new_tokens=15, min_new_tokens=15, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(out[0, 10:]) + "\n"


class CountingStreamer(BaseStreamer):
    def __init__(self):
        self.puts = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value.detach().clone())

    def end(self):
        self.ended += 1


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_base_streamer_put_calls(model, use_cache):
    ids = random_ids(1, 6, seed=42)
    streamer = CountingStreamer()
    out = model.generate(ids, max_new_tokens=17, min_new_tokens=17, do_sample=False, streamer=streamer, use_cache=use_cache)
    assert len(streamer.puts) == 1 + 17
    assert streamer.ended == 1
    assert torch.equal(streamer.puts[0].reshape(-1), ids[0])
    assert torch.equal(torch.cat([p.reshape(-1) for p in streamer.puts[1:]]), out[0, 6:])


# ---------------------------------------------------------------------------------------------------------
# 5. Continuing generation from a returned cache
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 2])
def test_continue_generation_from_returned_cache(model, batch):
    ids = random_ids(batch, 10, seed=50)
    first = model.generate(ids, max_new_tokens=7, min_new_tokens=7, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(first)
    assert isinstance(cache, PaTHCache)
    # the last generated token has not been fed through the model yet
    assert cache.get_seq_length() == first.sequences.shape[1] - 1
    second = model.generate(
        first.sequences, max_new_tokens=9, min_new_tokens=9, do_sample=False, return_dict_in_generate=True, **{CACHE_KW: cache}
    )
    assert cache_of(second) is cache
    assert cache.get_seq_length() == second.sequences.shape[1] - 1
    at_once = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(second.sequences, at_once)


@torch.no_grad()
def test_generate_fills_a_user_cache(model):
    ids = random_ids(1, 12, seed=51)
    cache = PaTHCache(model.config)
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True, **{CACHE_KW: cache})
    assert cache_of(out) is cache
    assert cache.get_seq_length() == 12 + 5 - 1
    assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False))


# ---------------------------------------------------------------------------------------------------------
# 6. Assisted / prompt-lookup decoding are refused
# ---------------------------------------------------------------------------------------------------------


REFUSAL = r"(?i)(stateful|crop|not supported)"


@torch.no_grad()
def test_prompt_lookup_decoding_refused(model):
    ids = random_ids(1, 12, seed=60)
    ids[0, 6:] = ids[0, :6]  # repeated n-grams, so prompt lookup would find candidates
    with pytest.raises((ValueError, NotImplementedError), match=REFUSAL):
        model.generate(ids, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)


@torch.no_grad()
def test_assisted_decoding_refused(model):
    ids = random_ids(1, 8, seed=61)
    assistant = make_model(seed=1)
    with pytest.raises((ValueError, NotImplementedError), match=REFUSAL):
        model.generate(ids, max_new_tokens=10, do_sample=False, assistant_model=assistant)


@torch.no_grad()
def test_static_cache_implementation_works_or_says_why(model):
    """cache_implementation="static" (the usual route to torch.compile) must either generate what the
    default cache generates or refuse with a message about the cache - not about an attention mask the
    caller never built (generate() builds a 4D mask for static caches)."""
    ids = random_ids(1, 9, seed=63)
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    try:
        out = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    except (ValueError, NotImplementedError, TypeError) as err:
        assert "static" in str(err).lower(), f"unclear error for cache_implementation='static': {err}"
    else:
        assert torch.equal(out, expected)


def test_cache_crop_refused_with_reason(model):
    cache = PaTHCache(model.config)
    with torch.no_grad():
        model(random_ids(1, 5, seed=62), use_cache=True, **{CACHE_KW: cache})
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.layers[0].crop(-1)
    assert cache.get_seq_length() == 5


# ---------------------------------------------------------------------------------------------------------
# 7. Drift of the cached keys in bfloat16
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _bf16_step_decode(model_bf16, ids, prompt_len, key_dtype):
    """Prefill prompt_len tokens, then decode the rest one token at a time with cache_key_dtype=key_dtype.
    Returns (final-step logits, keys of layer 0 after the last step)."""
    model_bf16.config.cache_key_dtype = key_dtype
    try:
        out = model_bf16(ids[:, :prompt_len], use_cache=True)
        cache = cache_of(out)
        for t in range(prompt_len, ids.shape[1]):
            out = model_bf16(ids[:, t : t + 1], use_cache=True, **{CACHE_KW: cache})
    finally:
        model_bf16.config.cache_key_dtype = "auto"
    assert cache.get_seq_length() == ids.shape[1]
    expected = torch.float32 if key_dtype == "float32" else torch.bfloat16
    assert cache.layers[0].keys.dtype == expected
    return out.logits[0, -1].double(), cache.layers[0].keys_view().double()


@torch.no_grad()
def test_bf16_step_decoding_drift_bounded(record_property):
    """bf16 model, 16-token prompt, 200 single decode steps. The final step's logits, compared to a float64
    forward of the same bf16-rounded weights, are no worse than 2x the bf16 full forward's error; the
    cached keys of layer 0 (whose inputs are identical in both paths) match a one-shot bf16 prefill to
    float32 accuracy. With cache_key_dtype="model" (bf16 keys) the keys drift by about 1e-2: recorded only.

    The forget gates are biased towards 1 (g_proj bias +4), so keys written 200 steps ago still carry
    attention weight: with the random init's gates (about 0.5 per step) old keys are forgotten and any
    drift in them would be invisible in the logits."""
    model_bf16 = make_model(seed=3, dtype=torch.bfloat16)
    for block in model_bf16.model.layers:
        block.attn.g_proj.bias.data.fill_(4.0)
    assert model_bf16.config.cache_key_dtype == "auto"  # float32 keys on a CPU
    ref64 = copy.deepcopy(model_bf16).double()  # the same (bf16-rounded) weights, computed in float64
    P, steps = 16, 200
    ids = random_ids(1, P + steps, seed=70)

    reference = ref64(ids, use_cache=False).logits[0, -1]
    full = model_bf16(ids, use_cache=False).logits[0, -1].double()
    oneshot_keys = cache_of(model_bf16(ids, use_cache=True)).layers[0].keys_view().double()
    step_logits, step_keys = _bf16_step_decode(model_bf16, ids, P, "float32")
    step_logits_bf16k, step_keys_bf16k = _bf16_step_decode(model_bf16, ids, P, "model")

    def key_err(keys):  # mean relative deviation from the one-shot prefill's keys
        return ((keys - oneshot_keys).abs().mean() / oneshot_keys.abs().mean()).item()

    full_err = (full - reference).abs().max().item()
    step_err = (step_logits - reference).abs().max().item()
    step_err_bf16k = (step_logits_bf16k - reference).abs().max().item()
    kerr, kerr_bf16k = key_err(step_keys), key_err(step_keys_bf16k)
    for name, value in [
        ("bf16_full_forward_logit_err", full_err),
        ("bf16_step_logit_err_float32_keys", step_err),
        ("bf16_step_logit_err_bf16_keys", step_err_bf16k),
        ("bf16_layer0_key_drift_float32_keys", kerr),
        ("bf16_layer0_key_drift_bf16_keys", kerr_bf16k),
    ]:
        record_property(name, value)
    print(
        f"\nbf16, {steps} decode steps: final-step max |logit error| vs float64: full forward {full_err:.4g}, "
        f"step decode with float32 keys {step_err:.4g}, with bf16 keys {step_err_bf16k:.4g}; "
        f"layer-0 key drift vs one-shot prefill: float32 keys {kerr:.3g}, bf16 keys {kerr_bf16k:.3g}"
    )
    assert full_err > 0
    assert step_err <= 2 * full_err + 0.01
    assert kerr < 1e-4


@torch.no_grad()
def test_mixed_key_dtype_without_the_decoding_kernel_keeps_float32_keys():
    """cache_key_dtype="mixed" rounds keys to the model dtype only where the decoding kernel keeps them in
    frames (CUDA); elsewhere every key is rewritten per step, so the cache keeps float32 keys and no ring,
    and generation equals the default's token for token."""
    model_bf16 = make_model(seed=4, dtype=torch.bfloat16)
    ids = random_ids(2, 12, seed=71)
    expected = model_bf16.generate(ids, max_new_tokens=8, do_sample=False)
    model_bf16.config.cache_key_dtype = "mixed"
    try:
        out = model_bf16(ids, use_cache=True)
        layer = cache_of(out).layers[0]
        assert layer.keys.dtype == torch.float32 and layer.key_ring is None
        assert torch.equal(model_bf16.generate(ids, max_new_tokens=8, do_sample=False), expected)
    finally:
        model_bf16.config.cache_key_dtype = "auto"


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_auto_key_dtype_is_mixed_only_for_half_precision_kernel_caches_with_frames(static, monkeypatch):
    """cache_key_dtype="auto" (the default) decides at the first write: "mixed" (keys in the model dtype, a
    float32 ring) for a bf16/fp16 model on the decoding kernel whose cache is over FRAMES_MIN_KEYS keys
    (batch x kv heads x the written length, or max_cache_len when static), else "float32"; a dynamic
    cache decides again after reset()."""
    monkeypatch.setattr(cache_path, "FRAMES_MIN_KEYS", 2 * 3 * 40)
    B, H, D = 2, 3, 8

    def first_write(length, dtype, kernel, layer=None):
        if layer is None:
            layer = (PaTHCache(num_hidden_layers=1) if not static
                     else PaTHStaticCache(num_hidden_layers=1, max_cache_len=length)).layers[0]
        assert layer.key_dtype == "auto"
        T = length if not static else 4
        keys, values = torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, H, D, dtype=dtype)
        layer.append(keys, values, None, decoding_kernel=kernel)
        return layer

    for length, dtype, kernel, chosen in [
        (41, torch.bfloat16, True, "mixed"), (41, torch.float16, True, "mixed"),
        (40, torch.bfloat16, True, "float32"),  # small cache: every key rewritten per step, no frames
        (41, torch.bfloat16, False, "float32"),  # PyTorch steps
        (41, torch.float32, True, "float32"),
    ]:
        layer = first_write(length, dtype, kernel)
        assert layer.key_dtype == chosen, (length, dtype, kernel)
        assert layer.keys.dtype == (dtype if chosen == "mixed" else torch.float32)
        assert (layer.key_ring is not None) == (chosen == "mixed")
    if not static:
        layer.reset()
        assert first_write(41, torch.bfloat16, True, layer).key_dtype == "mixed"


# ---------------------------------------------------------------------------------------------------------
# 8. Cache buffers: in place, growing in blocks
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_cache_buffers_updated_in_place_and_grow_in_blocks(model):
    steps = 600
    ids = random_ids(1, 21 + steps, seed=80)
    cache = cache_of(model(ids[:, :21], use_cache=True))
    layer = cache.layers[0]
    names = ("keys", "values", "gates")
    assert all(getattr(layer, n) is not None for n in names)

    # one step with room to spare: the very same tensor objects and storage, rows rewritten in place
    before = {n: getattr(layer, n) for n in names}
    ptrs = {n: t.data_ptr() for n, t in before.items()}
    capacity = layer.keys.shape[2]
    assert capacity > 22
    old_keys = layer.keys[:, :, :21].clone()
    model(ids[:, 21:22], use_cache=True, **{CACHE_KW: cache})
    for n in names:
        assert getattr(layer, n) is before[n], f"{n} buffer replaced although capacity sufficed"
        assert getattr(layer, n).data_ptr() == ptrs[n]
    assert not torch.equal(layer.keys[:, :, :21], old_keys), "cached keys must be rewritten by the new token's transform"

    changes = {n: 0 for n in names}
    current = {n: getattr(layer, n) for n in names}
    for t in range(22, 21 + steps):
        last = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KW: cache}).logits[:, -1]
        for n in names:
            if getattr(layer, n) is not current[n]:
                changes[n] += 1
                current[n] = getattr(layer, n)
    assert cache.get_seq_length() == 21 + steps
    assert layer.keys.shape[2] >= 21 + steps
    for n in names:
        assert 1 <= changes[n] <= 4, f"{n} buffer reallocated {changes[n]} times over {steps} steps"

    # the grown cache still decodes exactly
    full = model(ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(last, full, atol=1e-4, rtol=0)


class _CountLinear(torch.overrides.TorchFunctionMode):
    """Counts F.linear calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.nn.functional.linear
        return func(*args, **(kwargs or {}))


class _ShiftedLinear(torch.nn.Linear):
    """A Linear with an extra output shift, standing in for an adapter (LoRA) or a quantized layer."""

    def forward(self, x):
        return super().forward(x) + 0.5


@pytest.mark.parametrize("overrides", [{}, {"use_forget_gate": False}, {"use_low_rank_w": False}])
def test_decoding_step_fuses_input_projections(overrides):
    """One token with autograd off, and several tokens (a prefill): the projections reading the hidden state run
    as ONE product, and give the module calls' values (float64); one token with autograd on, or a non-plain
    Linear, takes the module calls (and an adapter's effect is kept)."""
    torch.manual_seed(0)
    attn = PaTHForCausalLM(make_config(**overrides)).double().model.layers[0].attn
    x = torch.randn(3, 1, 32, dtype=torch.float64)
    w_module = attn.w_proj
    expected = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), w_module(x), attn.bt_proj(x),
                attn.g_proj(x) if attn.use_forget_gate else None]
    with torch.no_grad(), _CountLinear() as counter:
        got = attn._input_projections(x)
    assert counter.calls == (2 if isinstance(w_module, torch.nn.Sequential) else 1)
    for e, g in zip(expected, got):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e.detach(), rtol=1e-12, atol=1e-12)

    with _CountLinear() as counter:  # autograd on: module calls
        attn._input_projections(x)
    assert counter.calls >= 5
    prompt = torch.randn(3, 4, 32, dtype=torch.float64)
    with torch.no_grad(), _CountLinear() as counter:  # a prefill: one product too (concatenated anew)
        got = attn._input_projections(prompt)
    assert counter.calls == (2 if isinstance(w_module, torch.nn.Sequential) else 1)
    modules = [attn.q_proj, attn.k_proj, attn.v_proj, w_module, attn.bt_proj, attn.g_proj if attn.use_forget_gate else None]
    for module, g in zip(modules, got):
        if module is None:
            assert g is None
        else:
            torch.testing.assert_close(g, module(prompt).detach(), rtol=1e-12, atol=1e-12)

    shifted = _ShiftedLinear(32, 32, bias=False, dtype=torch.float64)
    shifted.weight.data.copy_(attn.q_proj.weight)
    attn.q_proj = shifted
    with torch.no_grad():
        q = attn._input_projections(x)[0]
    torch.testing.assert_close(q, expected[0].detach() + 0.5, rtol=1e-12, atol=1e-12)
