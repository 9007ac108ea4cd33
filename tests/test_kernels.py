"""path-lm's Triton kernels (path_lm/path_triton.py, assembled by path_ops.path_attention_triton) against
independent float64 references: the explicit Householder formula in tests/reference.py for small cases,
the exact PyTorch path (itself checked against that formula in test_ops.py) for GPU-sized ones.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set in conftest.py before
triton is imported), with small chunks so that every level of the algorithm is exercised at small T.
"""

import pytest
import torch

pytest.importorskip("triton")

from reference import path_attention_recurrent, path_attention_reference, transformed_keys_reference  # noqa: E402
from test_ops import make_inputs  # noqa: E402

from path_lm.path_ops import path_attention_torch, path_attention_triton, resolve_backend  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INPUT_NAMES = ["q", "k", "v", "w", "beta", "g"]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_both(inputs, dtype, segment_ids=None, reference=path_attention_recurrent, **kernel_options):
    """Output, carried keys and every input gradient from the kernel (inputs cast to dtype; w, beta, g
    float32) and from the float64 reference, for one random output gradient."""
    inputs = [x.to(DEVICE) if x is not None else None for x in inputs]
    seg = segment_ids.to(DEVICE) if segment_ids is not None else None
    cast = [x.to(dtype if i < 3 else torch.float32) if x is not None else None for i, x in enumerate(inputs)]
    kernel_in = [x.requires_grad_() if x is not None else None for x in cast]
    o, keys = path_attention_triton(*kernel_in, segment_ids=seg, output_keys=True, **kernel_options)
    ref_in = [x.detach().double().requires_grad_() if x is not None else None for x in cast]
    o_ref = reference(*ref_in, segment_ids=seg)
    o_ref = o_ref[0] if isinstance(o_ref, tuple) else o_ref
    do = torch.randn_like(o_ref)
    present = [i for i, x in enumerate(inputs) if x is not None]
    grads = torch.autograd.grad(o, [kernel_in[i] for i in present], do.to(o.dtype))
    grads_ref = torch.autograd.grad(o_ref, [ref_in[i] for i in present], do)
    named = {INPUT_NAMES[i]: (a, b) for i, a, b in zip(present, grads, grads_ref)}
    return (o, o_ref), keys, named, [x.detach().double() if x is not None else None for x in cast]


# Small chunks (16) and superblocks of 1-8 chunks: T ~ 100 crosses every level (own chunk, earlier chunks of
# the superblock, earlier superblocks) and ends in a partial superblock.
SMALL = [
    dict(B=2, T=100, HQ=4, H=2, D=16, Dv=16, gate=True, chunks_per_superblock=2),
    dict(B=1, T=130, HQ=2, H=2, D=16, Dv=32, gate=False, chunks_per_superblock=4),
    dict(B=2, T=64, HQ=3, H=1, D=32, Dv=16, gate=True, chunks_per_superblock=4),
    dict(B=1, T=20, HQ=2, H=1, D=16, Dv=16, gate=True, chunks_per_superblock=8),
    # superblocks of one chunk: the superblock level alone, then no level past the own chunk
    dict(B=1, T=40, HQ=2, H=1, D=16, Dv=16, gate=True, chunks_per_superblock=1),
    dict(B=2, T=12, HQ=2, H=2, D=16, Dv=16, gate=True, chunks_per_superblock=1),
    # head dims past 64: the query side's backward takes the [C, D] tiles in blocks of 64 columns
    dict(B=1, T=40, HQ=4, H=2, D=128, Dv=128, gate=True, chunks_per_superblock=2),
]


def test_recurrent_reference_matches_explicit_formula():
    """The gradient reference below (the decoding recurrence) against the explicit product formula."""
    q, k, v, w, beta, g = make_inputs(2, 24, 4, 2, 8, seed=1)
    segment_ids = torch.zeros(2, 24, dtype=torch.long)
    segment_ids[0, 10:] = 1
    expected = path_attention_reference(q, k, v, w, beta, g, segment_ids=segment_ids)
    assert torch.allclose(path_attention_recurrent(q, k, v, w, beta, g, segment_ids=segment_ids), expected, atol=1e-12)


@pytest.mark.parametrize("case", SMALL, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_small_cases_match_float64_references(case):
    case = dict(case)
    nb = case.pop("chunks_per_superblock")
    inputs = make_inputs(**case, seed=case["T"])
    (o, o_ref), keys, grads, cast = run_both(inputs, torch.float32, chunk_size=16, chunks_per_superblock=nb)
    assert rel_err(o, o_ref) < 1e-5
    q, k, v, w, beta, g = cast
    assert rel_err(keys.cpu(), transformed_keys_reference(k.cpu(), w.cpu(), beta.cpu())) < 1e-5
    for name, (a, b) in grads.items():
        assert rel_err(a, b) < 1e-5, name


def test_chunks_of_64_match_float64_references():
    """The default chunk length: the forward preparation inverts each chunk's 64 x 64 triangular system in
    16 x 16 blocks (forward substitution on the diagonal blocks, block substitution below them), a path that
    chunks of 16 never take. Packed documents, GQA and the gate on."""
    inputs = make_inputs(2, 300, 4, 2, 16, seed=5)
    segment_ids = torch.zeros(2, 300, dtype=torch.long)
    segment_ids[0, 90:] = 1  # a document starting inside a chunk
    segment_ids[1, :7] = -1
    (o, o_ref), keys, grads, cast = run_both(inputs, torch.float32, segment_ids, chunk_size=64, chunks_per_superblock=2)
    assert rel_err(o, o_ref) < 1e-5
    for name, (a, b) in grads.items():
        assert rel_err(a, b) < 1e-5, name
    q, k, v, w, beta, g = cast
    assert rel_err(keys[1:, 7:].cpu(), transformed_keys_reference(*(x[1:, 7:].cpu() for x in (k, w, beta)))) < 1e-5


def _saved_bytes(fn):
    """fn()'s result and the bytes autograd saved for its backward while it ran."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(sizes)


def test_kept_preparation_gives_the_recomputed_gradients():
    """keep_preparation=True: the forward keeps the preparation's backward tables and the backward skips
    its rerun. Output and every gradient equal the rerun's (exactly on the CPU, where the kernels run in
    order; the rerun is checked against float64 references above, and on a GPU both are in
    test_gpu_default_blocks_match_torch_path); a second backward over the kept tables (retain_graph) gives
    the same gradients again, so nothing kept is overwritten; the forward saves more for the backward, and
    nothing more when no input needs a gradient. Packed documents, GQA, the gate, all three levels (T = 70,
    superblocks of two chunks of 16, the last one partial)."""
    inputs = make_inputs(2, 70, 4, 2, 16, seed=7)
    segment_ids = torch.zeros(2, 70, dtype=torch.long)
    segment_ids[1, 45:] = 1
    options = dict(segment_ids=segment_ids.to(DEVICE), chunk_size=16, chunks_per_superblock=2)
    present = [x.to(DEVICE) for x in inputs if x is not None]
    do = torch.randn(2, 70, 4, 16, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    runs, saved = {}, {}
    for keep in (False, True):
        xs = [x.clone().requires_grad_() for x in present]
        o, saved[keep] = _saved_bytes(lambda: path_attention_triton(*xs, **options, keep_preparation=keep)[0])
        first = torch.autograd.grad(o, xs, do, retain_graph=keep)
        if keep:
            second = torch.autograd.grad(o, xs, do)
            for name, a, b in zip(INPUT_NAMES, first, second):
                assert torch.equal(a, b) if not CUDA else torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        runs[keep] = (o, first)
    assert saved[True] > 2 * saved[False]
    for name, a, b in zip(["o", *INPUT_NAMES], [runs[False][0], *runs[False][1]], [runs[True][0], *runs[True][1]]):
        assert torch.equal(a, b) if not CUDA else torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    frozen = [x.clone() for x in present]
    _, no_grad_saved = _saved_bytes(lambda: path_attention_triton(*frozen, **options, keep_preparation=True))
    assert no_grad_saved == 0


def test_backward_rerun_reads_the_forwards_inverses():
    """The backward reruns the preparation with the chunks' triangular inverses that the forward solved
    (kept between the passes): every table of the rerun equals the one with the inverses solved again
    (exactly on the CPU), and another inverse changes them, so the rerun reads what it is given. The
    gradients through this path are checked against float64 references above."""
    from path_lm import path_ops
    from path_lm.path_triton import prepare_forward

    q, k, v, w, beta, g = (x.to(DEVICE) for x in make_inputs(2, 70, 4, 2, 16, seed=11))
    C, NB, T_pad = 16, 2, 96
    seg_start, _ = path_ops._segment_bounds(None, 2, 70, T_pad, q.device)
    gate, v_kernel = path_ops._kernel_inputs(v, g, T_pad, torch.float32)
    args = (q, k, v_kernel, w, beta, gate, seg_start)
    options = dict(chunk=C, chunks_per_superblock=NB, scale=0.25, keys32=False)
    forward = prepare_forward(*args, **options)
    solved = prepare_forward(*args, **options, for_backward=True)
    given = prepare_forward(*args, **options, for_backward=True, t_inv=forward["t_inv"].clone())
    oc = torch.arange(C, device=q.device)
    lower_blocks = (oc[:, None] // 16 >= oc[None, :] // 16)  # the blocks the kernel writes (the rest is unused)
    same = torch.equal if not CUDA else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert same(given["t_inv"] * lower_blocks, solved["t_inv"] * lower_blocks)
    for name, table in solved.items():
        if table is not None and name != "t_inv":
            assert same(given[name], table), name
    other = prepare_forward(*args, **options, for_backward=True, t_inv=torch.zeros_like(forward["t_inv"]))
    assert not torch.allclose(other["p"], solved["p"])


@pytest.mark.parametrize("C", [32, 64, pytest.param(128, marks=pytest.mark.skipif(
    CUDA, reason="chunks of 128 are checked in Triton's interpreter: on a GPU this case did not finish in minutes"))])
def test_chunk_inverses_match_float64(C):
    """Every chunk's triangular inverse (I + M)^-1, M = tril(W W^T, -1) diag(beta), that the forward solves
    (all diagonal blocks of 16 at once, then block substitution below them) against torch.linalg.inv in
    float64, float32 inputs: random chunks, a partial last chunk, and in the second batch chunks of nearly
    parallel w with beta near 2, whose inverse is a sum of series terms far larger than itself."""
    from path_lm import path_ops
    from path_lm.path_triton import prepare_forward

    B, T, H, D = 2, 2 * C - 5, 2, 16
    q, k, v, w, beta, g = make_inputs(B, T, 2, H, D, seed=C)
    direction = torch.randn(D, dtype=torch.float64)
    w[1] = direction + 0.05 * torch.randn(T, H, D, dtype=torch.float64)
    w[1] = w[1] / w[1].norm(dim=-1, keepdim=True)
    beta[1] = 1.99
    n = (T + C - 1) // C
    T_pad = n * C
    seg_start, _ = path_ops._segment_bounds(None, B, T, T_pad, "cpu")
    gate, v_kernel = path_ops._kernel_inputs(v.float().to(DEVICE), g.float().to(DEVICE), T_pad, torch.float32)
    args = [x.float().to(DEVICE) for x in (q, k, v_kernel, w, beta, gate, seg_start)]
    args[-1] = seg_start.to(DEVICE)
    out = prepare_forward(*args, chunk=C, chunks_per_superblock=1, scale=0.25, keys32=False)
    oc = torch.arange(C)
    written = oc[:, None] // 16 >= oc[None, :] // 16
    w_pad = torch.nn.functional.pad(w.float().double(), (0, 0, 0, 0, 0, T_pad - T)).view(B, n, C, H, D)
    beta_pad = torch.nn.functional.pad(beta.float().double(), (0, 0, 0, T_pad - T)).view(B, n, C, H)
    t_inv = out["t_inv"].cpu().double().view(B, H, n, C, C)
    errs = []
    for b in range(B):
        for h in range(H):
            for c in range(n):
                wc, bc = w_pad[b, c, :, h], beta_pad[b, c, :, h]
                m = torch.tril(wc @ wc.T, -1) * bc[None, :]
                expected = torch.linalg.inv(torch.eye(C, dtype=torch.float64) + m)
                errs.append(rel_err(torch.where(written, t_inv[b, h, c], 0.0), expected))
    assert max(errs[: H * n]) < 1e-6  # random chunks
    assert max(errs[H * n:]) < 1e-4  # nearly parallel w: float32's rounding times the inverse's condition


def test_chunk_size_must_be_a_power_of_two_of_at_least_16():
    q, k, v, w, beta, g = make_inputs(1, 40, 2, 1, 16, seed=7)
    for bad in (8, 48):
        with pytest.raises(ValueError, match="power of two of at least 16"):
            path_attention_triton(q, k, v, w, beta, g, chunk_size=bad)


def test_inputs_past_32_bit_offsets_are_refused():
    """The kernels index with 32-bit offsets: larger inputs get a clear error (auto falls back)."""
    from path_lm.path_ops import _offsets_problem

    big = torch.empty(64, 8192, 32, 128, device="meta")  # 2^31 elements, nothing allocated
    assert "split the batch" in _offsets_problem(big, big)
    assert _offsets_problem(big[:63], big[:63]) is None
    assert "time padded to 512" in _offsets_problem(big[:, :8100], big[:, :8100])  # padding counts
    q, k, v, w, beta, g = (torch.empty(64, 8192, 32, 128, device="meta") for _ in range(6))
    with pytest.raises(ValueError, match="32-bit offsets"):
        path_attention_triton(q, k, v, w, beta[..., 0], g[..., 0])


def test_chain_kernels_by_column_blocks(monkeypatch):
    """Head dims above 64 split the D x D chains (the superblock kernel, the chains' backward) over programs
    by columns, and run the superblock kernel's tasks first; forced here at D = 32 with blocks of 16 columns."""
    from path_lm import path_triton

    monkeypatch.setattr(path_triton, "_chain_launch", lambda D: dict(columns=16, num_warps=4, num_stages=1))
    monkeypatch.setitem(path_triton.SUPERBLOCK_TASKS_FIRST, 64, True)
    inputs = make_inputs(1, 80, 2, 1, 32, seed=6)
    (o, o_ref), keys, grads, cast = run_both(inputs, torch.float32, chunk_size=16, chunks_per_superblock=2)
    assert rel_err(o, o_ref) < 1e-5
    q, k, v, w, beta, g = cast
    assert rel_err(keys.cpu(), transformed_keys_reference(k.cpu(), w.cpu(), beta.cpu())) < 1e-5
    for name, (a, b) in grads.items():
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("T_in, T_out", [(1500, 2048), (2048, 1500), (700, 700)])
def test_gate_scan_matches_cumulative_sums(T_in, T_out):
    """The forget gate's cumulative log (forward) and its gradient's reverse cumulative sum over the summed
    levels (backward), in blocks of 1024 positions with a carry, against float64 cumulative sums."""
    from path_lm.path_triton import gate_scan

    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(2, T_in, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    N = max(T_in, T_out)
    for n_parts in (1, 3):
        total = torch.nn.functional.pad(sum(parts[:n_parts]), (0, 0, 0, N - T_in))
        cast = [x.float().to(DEVICE) for x in parts[:n_parts]]
        forward = gate_scan(cast, T_out, reverse=False).cpu()
        torch.testing.assert_close(forward.double(), total.cumsum(1)[:, :T_out], rtol=1e-5, atol=1e-4)
        backward = gate_scan(cast, T_out, reverse=True, dtype=torch.bfloat16).cpu()
        assert backward.dtype == torch.bfloat16
        expected = total.flip(1).cumsum(1).flip(1)[:, :T_out]
        torch.testing.assert_close(backward.double(), expected, rtol=1e-2, atol=1e-1)


@pytest.mark.parametrize("one_kernel", [True, False])
def test_key_side_of_the_chunk_backward_in_one_or_three_launches(monkeypatch, one_kernel):
    """The per-chunk backward's key side runs as one kernel up to head dim 64 and as three launches above
    (KEY_SIDE_ONE_KERNEL); both forced here at D = 32, with GQA, packed documents and the gate."""
    from path_lm import path_triton

    monkeypatch.setattr(path_triton, "KEY_SIDE_ONE_KERNEL", {32: True} if one_kernel else {})
    inputs = make_inputs(2, 70, 4, 2, 32, seed=8)
    segment_ids = torch.tensor([[0] * 30 + [1] * 40, [0] * 70])
    (o, o_ref), keys, grads, cast = run_both(inputs, torch.float32, segment_ids, chunk_size=16, chunks_per_superblock=2)
    assert rel_err(o, o_ref) < 1e-5
    for name, (a, b) in grads.items():
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("NB, columns", [(2, 32), (6, 32), (5, 16)])
def test_frame_changes_match_explicit_products(monkeypatch, NB, columns):
    """path_triton.frame_changes (the superblock level's frame changes, one chain per program) against the
    products P_{s-1} ... P_{t+1} of every pair s > t formed one by one in float64, in the packed row-by-row
    order; the half-precision copy is the float32 one rounded."""
    from path_lm import path_triton

    monkeypatch.setattr(path_triton, "_chain_launch", lambda D: dict(columns=columns, num_warps=4, num_stages=1))
    B, H, D = 2, 3, 32
    gen = torch.Generator().manual_seed(11)
    p = torch.linalg.qr(torch.randn(B, H, NB, D, D, generator=gen, dtype=torch.float64))[0]  # products of reflections
    p = p + 0.05 * torch.randn(B, H, NB, D, D, generator=gen, dtype=torch.float64)  # and not orthogonal
    half, full = path_triton.frame_changes(p.float().to(DEVICE), out_dtype=torch.bfloat16, precision="ieee",
                                           float32_copy=True)
    assert half.shape == full.shape == (B, H, 1, NB * (NB - 1) // 2, D, D) and half.dtype == torch.bfloat16
    index = 0
    for s in range(1, NB):
        for t in range(s):
            expected = torch.eye(D, dtype=torch.float64).expand(B, H, D, D)
            for j in range(t + 1, s):  # F[s, t] = P_{s-1} ... P_{t+1}: later blocks on the left
                expected = p[:, :, j] @ expected
            assert rel_err(full[:, :, 0, index].cpu(), expected) < 1e-5, (s, t)
            index += 1
    if CUDA:
        assert torch.equal(half, full.to(torch.bfloat16))
    else:  # Triton's interpreter rounds to bf16 otherwise than the GPU (within one bf16 step)
        assert ((half.float() - full).abs() <= 2**-7 * full.abs()).all()
    assert torch.equal(path_triton.frame_changes(p.float().to(DEVICE), out_dtype=torch.float32, precision="ieee"), full)


@pytest.mark.parametrize("query_tile, key_tile", [(16, 32), (32, 16)])
def test_unequal_query_and_key_tiles(monkeypatch, query_tile, key_tile):
    """The launch table may give an attention kernel more keys than queries per tile or the reverse (the
    superblock level's dq at head dim 64, its dkv at 128); forced here for every kernel and level, with
    frame blocks of 16 and 64 so that both tiles divide every block, packed documents and the gate on."""
    from path_lm import path_triton

    table = {key: dict(config, BM=query_tile, BN=key_tile) for key, config in path_triton.ATTENTION_LAUNCH.items()}
    monkeypatch.setattr(path_triton, "ATTENTION_LAUNCH", table)
    inputs = make_inputs(2, 200, 4, 2, 16, seed=9)  # four superblocks: frame changes past the identity
    segment_ids = torch.zeros(2, 200, dtype=torch.long)
    segment_ids[1, 70:] = 1
    (o, o_ref), keys, grads, cast = run_both(inputs, torch.float32, segment_ids, chunk_size=16, chunks_per_superblock=4)
    assert rel_err(o, o_ref) < 1e-5
    for name, (a, b) in grads.items():
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("heads", [(2, 2), (4, 2)])
def test_kernels_write_every_element_they_return(monkeypatch, heads):
    """Uninitialized buffers (torch.empty) filled with NaN change nothing: every kernel writes all of what it
    returns, e.g. the chunk level's pair gradients that one program per pair stores (one query head per kv
    head) with zeros for the pairs before a tile's first segment, and a GQA group's atomic adds. Packed
    documents, so that tiles start past earlier blocks."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    HQ, H = heads
    inputs = make_inputs(2, 96, HQ, H, 16, seed=11)
    segment_ids = torch.zeros(2, 96, dtype=torch.long)
    segment_ids[0, 50:] = 1  # the second document starts in the fourth chunk of 16
    segment_ids[1, 20:] = 1
    (o, o_ref), _, grads, _ = run_both(inputs, torch.float32, segment_ids, chunk_size=16, chunks_per_superblock=4)
    assert rel_err(o, o_ref) < 1e-5
    for name, (a, b) in grads.items():
        assert rel_err(a, b) < 1e-5, name


def test_packed_and_padded_segments_match_float64_references():
    inputs = make_inputs(2, 90, 4, 2, 16, seed=3)
    segment_ids = torch.zeros(2, 90, dtype=torch.long)
    segment_ids[0, 37:] = 1
    segment_ids[0, 70:] = 2  # three packed documents
    segment_ids[1, :21] = -1  # left padding
    (o, o_ref), keys, grads, cast = run_both(
        inputs, torch.float32, segment_ids, chunk_size=16, chunks_per_superblock=2
    )
    assert rel_err(o, o_ref) < 1e-5
    for name, (a, b) in grads.items():
        assert rel_err(a, b) < 1e-5, name
    # the real tokens of row 1 are one sequence: their keys are carried to the row's end
    q, k, v, w, beta, g = cast
    k, w, beta = (x[1:, 21:].cpu() for x in (k, w, beta))
    assert rel_err(keys[1:, 21:].cpu(), transformed_keys_reference(k, w, beta)) < 1e-5


@pytest.mark.parametrize("B, T, T_pad", [(2, 100, 128), (1, 128, 128), (3, 1, 512)])
def test_segment_bounds_without_segment_ids_equal_one_segment_per_row(B, T, T_pad):
    """The kernels' segment bounds without segment_ids (a shortcut) equal those of one explicit segment per
    row: start 0 and end T for real positions, the padding its own segment [T, T_pad)."""
    from path_lm.path_ops import _segment_bounds

    shortcut = _segment_bounds(None, B, T, T_pad, DEVICE)
    general = _segment_bounds(torch.zeros(B, T, dtype=torch.long, device=DEVICE), B, T, T_pad, DEVICE)
    for a, b in zip(shortcut, general):
        assert a.dtype == torch.int32 and a.is_contiguous() and torch.equal(a, b)
    assert shortcut[0][:, :T].eq(0).all() and shortcut[1][:, :T].eq(T).all()
    assert shortcut[0][:, T:].eq(T).all() and shortcut[1][:, T:].eq(T_pad).all()


def test_forward_without_gradients_runs_in_slices_of_rows(monkeypatch):
    """Without gradients the op runs on slices of rows (bounded temporaries for large prefills): outputs and
    carried keys equal the whole batch's, packed documents and padding included; with gradients it does not
    slice."""
    from path_lm import path_ops

    q, k, v, w, beta, g = (x.to(DEVICE) for x in make_inputs(5, 40, 4, 2, 16, seed=4))
    segment_ids = torch.zeros(5, 40, dtype=torch.long, device=DEVICE)
    segment_ids[1, 25:] = 1
    segment_ids[3, :7] = -1
    options = dict(segment_ids=segment_ids, output_keys=True, chunk_size=16, chunks_per_superblock=2)
    with torch.no_grad():
        o_whole, keys_whole = path_attention_triton(q, k, v, w, beta, g, **options)
        calls = []
        apply = path_ops._PaTHTriton.apply
        monkeypatch.setattr(path_ops._PaTHTriton, "apply", lambda *a: calls.append(a[0].shape[0]) or apply(*a))
        monkeypatch.setattr(path_ops, "FORWARD_SLICE_TOKEN_HEADS", 2 * 40 * 4)  # two rows per slice
        o, keys = path_attention_triton(q, k, v, w, beta, g, **options)
    assert calls == [2, 2, 1]
    torch.testing.assert_close(o, o_whole, rtol=0, atol=0)
    torch.testing.assert_close(keys, keys_whole, rtol=0, atol=0)
    calls.clear()
    path_attention_triton(q.requires_grad_(), k, v, w, beta, g, segment_ids=segment_ids, chunk_size=16)
    assert calls == [5]


def test_resolve_backend_on_cpu_falls_back_and_explicit_triton_raises():
    q = torch.randn(1, 4, 2, 64)
    assert resolve_backend("auto", q, q) == "torch"
    with pytest.raises(RuntimeError, match="not on a CUDA device"):
        resolve_backend("triton", q, q)


gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def torch_path(*args, segment_ids=None):
    return path_attention_torch(*args, segment_ids=segment_ids)[0]


@gpu
def test_gpu_chunks_too_large_for_shared_memory_are_refused():
    q, k, v, w, beta, g = (x.to(DEVICE) for x in make_inputs(1, 256, 2, 1, 64, seed=7))
    with pytest.raises(ValueError, match="Use at most 64"):
        path_attention_triton(q, k, v, w, beta, g, chunk_size=128)


@gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("keep", [False, True], ids=["rerun", "kept"])
def test_gpu_default_blocks_match_torch_path(D, dtype, gate, keep):
    # T = 1200: two full superblocks of 8 x 64 and a partial one; GQA 4 query heads on 2 kv heads
    inputs = make_inputs(2, 1200, 4, 2, D, gate=gate, seed=D)
    (o, o_ref), keys, grads, cast = run_both(inputs, dtype, reference=torch_path, keep_preparation=keep)
    assert rel_err(o, o_ref) < 1e-2
    for name, (a, b) in grads.items():
        assert rel_err(a, b) < 2e-2, name
    _, state = path_attention_torch(*cast, output_state=True)
    assert rel_err(keys, state.keys) < 1e-2


def assert_bf16_matches_torch_path(inputs, segment_ids):
    """The kernel in bf16 against the exact PyTorch path: output and every input gradient."""
    (o, o_ref), _, grads, _ = run_both(inputs, torch.bfloat16, segment_ids, reference=torch_path)
    assert rel_err(o, o_ref) < 1e-2
    for name, (a, b) in grads.items():
        assert rel_err(a, b) < 2e-2, name


@gpu
def test_gpu_packed_documents_match_torch_path():
    inputs = make_inputs(2, 1100, 8, 2, 64, seed=5)
    segment_ids = torch.zeros(2, 1100, dtype=torch.long)
    segment_ids[0, 300:] = 1
    segment_ids[0, 555:] = 2
    segment_ids[0, 1090:] = 3
    segment_ids[1, :700] = -1
    assert_bf16_matches_torch_path(inputs, segment_ids)


def test_auto_picks_the_faster_kernel_for_the_pass(monkeypatch):
    """With both kernels usable: path-lm's at head dim 64 from AUTO_TRITON_MIN_LENGTH tokens without
    gradients and from AUTO_TRITON_MIN_TRAINING_LENGTH with them (the pass decides, not the tensor), fla's at
    head dim 128 or for shorter sequences (the measured order, docs/benchmarks.md)."""
    from path_lm import path_ops

    for name in path_ops.KERNELS:
        monkeypatch.setitem(path_ops.KERNELS, name, lambda q, v: None)
    infer, train = path_ops.AUTO_TRITON_MIN_LENGTH, path_ops.AUTO_TRITON_MIN_TRAINING_LENGTH
    assert infer < train
    q64, q128 = torch.randn(1, train, 1, 64), torch.randn(1, train, 1, 128)
    assert resolve_backend("auto", q64[:, :infer], q64[:, :infer]) == "triton"
    assert resolve_backend("auto", q64[:, : infer - 1], q64[:, : infer - 1]) == "fla"
    assert resolve_backend("auto", q128, q128) == "fla"
    q64.requires_grad_()
    q128.requires_grad_()
    assert resolve_backend("auto", q64, q64) == "triton"  # training
    assert resolve_backend("auto", q64[:, : train - 1], q64[:, : train - 1]) == "fla"
    assert resolve_backend("auto", q64[:, :infer], q64[:, :infer]) == "fla"
    assert resolve_backend("auto", q128, q128) == "fla"
    with torch.no_grad():  # a model that needs gradients, run for inference
        assert resolve_backend("auto", q64[:, :infer], q64[:, :infer]) == "triton"


@gpu
def test_gpu_auto_uses_path_lm_kernel_without_fla(monkeypatch):
    from path_lm import path_ops

    monkeypatch.setitem(path_ops.KERNELS, "fla", lambda q, v: "fla is not installed")
    q = torch.randn(1, 4, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    assert resolve_backend("auto", q, q) == "triton"
    q48 = torch.randn(1, 4, 2, 48, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="head dims"):
        resolve_backend("triton", q48, q48)


# ---------------------------------------------------------------------------------------------------------
# The layer's w before attention: short convolution, SiLU and normalization in one kernel each way
# ---------------------------------------------------------------------------------------------------------


def short_conv_reference(x, weight, bias, segment_ids, head_dim, dtype):
    """Float64 formula of the layer's w: y_t = sum_s x_{t-s} c_{K-1-s} (taps within the sequence and the
    segment) + bias, silu, each head's D channels scaled to unit norm (|.|^2 + 1e-6). The weights enter rounded
    to dtype (as the module's ``.to(x.dtype)``), with the gradient of the unrounded ones."""
    B, T, C = x.shape
    K = weight.shape[-1]
    c = weight[:, 0, :] + (weight[:, 0, :].to(dtype).double() - weight[:, 0, :]).detach()
    y = x * c[:, K - 1]
    for shift in range(1, K):
        same = torch.zeros(B, T, dtype=torch.bool)
        same[:, shift:] = True if segment_ids is None else segment_ids[:, shift:] == segment_ids[:, :-shift]
        earlier = torch.nn.functional.pad(x, (0, 0, shift, 0))[:, :T]
        y = y + earlier * c[:, K - 1 - shift] * same[..., None]
    if bias is not None:
        y = y + bias + (bias.to(dtype).double() - bias).detach()
    a = torch.nn.functional.silu(y).view(B, T, C // head_dim, head_dim)
    return (a * torch.rsqrt(a.pow(2).sum(-1, keepdim=True) + 1e-6)).view(B, T, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []),
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("taps, bias, packed", [(3, False, False), (3, True, True), (4, True, False), (2, False, True),
                                                (1, True, True)])
def test_short_conv_normalize_matches_the_module_path(dtype, taps, bias, packed):
    """path_triton.short_conv_normalize against the layer's PyTorch ops (PaTHShortConvolution in the input
    dtype, then the normalization in float32: equal up to a rounding step where exp differs) and every
    gradient (x, the convolution's weight and bias) against float64 autograd of the explicit formula. Two
    heads, a length that is no multiple of the kernel's row blocks, packed documents with segments of one token.
    bf16 on a GPU only: Triton's CPU interpreter does not round to bf16 (fp16 checks the roundings here)."""
    from path_lm.modeling_path import PaTHShortConvolution
    from path_lm.path_triton import short_conv_normalize

    gen = torch.Generator().manual_seed(taps)
    B, T, D, H = 2, 150, 16, 2
    conv = PaTHShortConvolution(H * D, taps, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        if bias:
            conv.bias.copy_(torch.randn(H * D, generator=gen) / 4)
    x = torch.randn(B, T, H * D, generator=gen).to(dtype)
    segment_ids = torch.cumsum(torch.rand(B, T, generator=gen) < 0.2, 1) if packed else None
    if packed:
        segment_ids[0, 40:42] = segment_ids[0, 39] + torch.tensor([1, 2])  # segments of one token
        segment_ids[0, 42:] += 3

    y, _ = conv(x, segment_ids)
    module = y.view(B, T, H, D).float()
    module = (module * torch.rsqrt(module.pow(2).sum(-1, keepdim=True) + 1e-6)).view(B, T, H * D)

    conv = conv.to(DEVICE)
    x_k = x.to(DEVICE).requires_grad_()
    out = short_conv_normalize(x_k, conv.weight, conv.bias, segment_ids.to(DEVICE) if packed else None, head_dim=D)
    assert out.dtype == torch.float32 and out.shape == (B, T, H * D)
    assert rel_err(out.cpu(), module) < (1e-6 if dtype == torch.float32 else 1e-4)

    params = [conv.weight] + ([conv.bias] if bias else [])
    ref_in = [x.double().requires_grad_()] + [p.detach().cpu().double().requires_grad_() for p in params]
    ref = short_conv_reference(ref_in[0], ref_in[1], ref_in[2] if bias else None, segment_ids, D, dtype)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, [x_k, *params], grad_out.float().to(DEVICE))
    grads_ref = torch.autograd.grad(ref, ref_in, grad_out)
    tolerance = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    for name, a, b in zip(["x", "weight", "bias"], grads, grads_ref):
        assert a.shape == b.shape and a.dtype == (dtype if name == "x" else torch.float32), name
        assert rel_err(a.cpu(), b) < tolerance, name


def test_short_conv_normalize_refuses_channels_it_cannot_split():
    from path_lm.path_triton import short_conv_normalize

    x = torch.randn(2, 8, 48, device=DEVICE)
    weight = torch.randn(48, 1, 3, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of a power-of-two head_dim"):
        short_conv_normalize(x, weight, head_dim=32)
    with pytest.raises(ValueError, match="contiguous"):
        short_conv_normalize(x.transpose(0, 1), weight, head_dim=16)


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else []), ids=lambda d: str(d)[6:])
def test_model_runs_the_w_path_through_the_kernel(monkeypatch, dtype):
    """A PaTH model whose layers take the fused w path (forced on here; on CUDA it is the default) gives the
    module path's loss, logits and parameter gradients on packed documents and left padding, and leaves the
    same convolution state in the cache (the greedy continuation matches)."""
    from path_lm import modeling_path
    from path_lm.configuration_path import PaTHConfig
    from path_lm.modeling_path import PaTHForCausalLM

    config = PaTHConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_heads=4, intermediate_size=96,
                        use_forget_gate=True, conv_bias=True, conv_size=4, attn_backend="torch", chunk_size=16)
    torch.manual_seed(0)
    model = PaTHForCausalLM(config).to(DEVICE, dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 45), generator=gen).to(DEVICE)
    position_ids = torch.cat([torch.arange(20), torch.arange(25)]).repeat(2, 1).to(DEVICE)
    calls = []
    kernel = modeling_path.short_conv_normalize
    monkeypatch.setattr(modeling_path, "short_conv_normalize", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    results = []
    for fused in (False, True):
        monkeypatch.setattr(modeling_path, "short_conv_kernel_usable", lambda *a: fused)
        model.zero_grad()
        out = model(input_ids=ids, position_ids=position_ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            mask = torch.ones_like(ids)
            mask[1, :7] = 0
            continued = model.generate(ids[:, :30], attention_mask=mask[:, :30], max_new_tokens=3, do_sample=False,
                                       pad_token_id=0)
        results.append((out.logits.detach(), out.loss.detach(), grads, continued))
    assert len(calls) == 2 * config.num_hidden_layers  # training and the prefill; the steps carry the state
    (logits, loss, grads, continued), (logits_k, loss_k, grads_k, continued_k) = results
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(logits_k, logits, **tol)
    torch.testing.assert_close(loss_k, loss, **tol)
    for name in grads:
        assert rel_err(grads_k[name], grads[name]) < (1e-5 if dtype == torch.float32 else 3e-2), name
    assert torch.equal(continued_k, continued)


# ---------------------------------------------------------------------------------------------------------
# The gated MLP's activation from one product of gate and up: silu(gate) * up in one kernel each way
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []),
                         ids=lambda d: str(d).removeprefix("torch."))
def test_gated_silu_matches_the_formula(dtype):
    """path_triton.gated_silu against PyTorch's two ops in the same dtype (equal but for a rounding step where
    exp differs) and its gradient against float64 autograd of silu(g) * u. Widths that are no multiple of the
    kernel's column block; rows of a 3-d input. bf16 on a GPU only (the CPU interpreter does not round to it)."""
    from path_lm.path_triton import GATED_SILU_BLOCK, gated_silu

    gen = torch.Generator().manual_seed(3)
    width = GATED_SILU_BLOCK + 77
    y = (3 * torch.randn(2, 5, 2 * width, generator=gen)).to(dtype)
    y_k = y.to(DEVICE).requires_grad_()
    out = gated_silu(y_k)
    torch_ops = torch.nn.functional.silu(y[..., :width]) * y[..., width:]
    assert out.dtype == dtype and out.shape == (2, 5, width)
    steps = 2 * torch.finfo(dtype).eps  # (the SiLU's rounding one step off moves the product's by up to two)
    assert ((out.cpu().float() - torch_ops.float()).abs() <= steps * torch_ops.float().abs() + 1e-5).all()
    assert (out.cpu() != torch_ops).float().mean() < (0.5 if dtype == torch.float32 else 0.01)

    y64 = y.double().requires_grad_()
    ref = torch.nn.functional.silu(y64[..., :width]) * y64[..., width:]
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, y_k, grad_out.to(dtype).to(DEVICE))
    (grad_ref,) = torch.autograd.grad(ref, y64, grad_out.to(dtype).double())
    assert grad.dtype == dtype and grad.shape == y.shape
    assert rel_err(grad.cpu(), grad_ref) < {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


def test_gated_silu_refuses_what_it_cannot_read():
    from path_lm.path_triton import gated_silu

    with pytest.raises(ValueError, match="2 \\* I"):
        gated_silu(torch.randn(4, 7, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        gated_silu(torch.randn(8, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match="float32"):
        gated_silu(torch.randn(4, 8, device=DEVICE, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else []), ids=lambda d: str(d)[6:])
def test_model_runs_the_gated_mlp_through_the_kernel(monkeypatch, dtype):
    """A PaTH model whose MLPs take one product of gate and up and the gated SiLU kernel (forced on here; on
    CUDA it is the default) gives the module calls' loss, logits and every parameter gradient; a forward hook on
    up_proj, and the "torch" backend, keep the module calls."""
    from path_lm import modeling_path
    from path_lm.configuration_path import PaTHConfig
    from path_lm.modeling_path import PaTHForCausalLM

    config = PaTHConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_heads=4, intermediate_size=96,
                        use_forget_gate=True, attn_backend="torch", chunk_size=16)
    torch.manual_seed(0)
    model = PaTHForCausalLM(config).to(DEVICE, dtype)
    ids = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    calls = []
    kernel = modeling_path.gated_silu
    monkeypatch.setattr(modeling_path, "gated_silu", lambda *a: calls.append(1) or kernel(*a))
    usable = modeling_path.gated_silu_usable
    results = []
    for fused in (False, True):
        monkeypatch.setattr(modeling_path, "gated_silu_usable", lambda x, backend: fused and usable(x, "triton")
                            if x.is_cuda else fused)
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(calls) == config.num_hidden_layers
    (logits, loss, grads), (logits_k, loss_k, grads_k) = results
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(logits_k, logits, **tol)
    torch.testing.assert_close(loss_k, loss, **tol)
    for name in grads:
        assert rel_err(grads_k[name], grads[name]) < (1e-5 if dtype == torch.float32 else 3e-2), name

    calls.clear()
    handle = model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *a: None)
    model(input_ids=ids)
    handle.remove()
    assert len(calls) == config.num_hidden_layers - 1
    monkeypatch.setattr(modeling_path, "gated_silu_usable", usable)
    calls.clear()
    model(input_ids=ids)  # attn_backend="torch": PyTorch ops
    assert not calls


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []),
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("add", [False, True], ids=["norm", "add-norm"])
def test_rms_norm_matches_the_formula(out_dtype, add):
    """path_triton.rms_norm (float32 in, out_dtype out) against x * rsqrt(mean(x^2) + eps) * w in float64,
    rounded once to out_dtype; dx and dw against float64 autograd of the formula. add_rms_norm: the same of h =
    x + a (a in out_dtype, as a sublayer's output under autocast), h itself, and the gradients of x and a with
    h's own gradient added. A width that is no power of two, and rows that do not divide evenly among the
    backward's programs (each sums its rows' share of dw)."""
    from path_lm.path_triton import add_rms_norm, rms_norm

    gen = torch.Generator().manual_seed(4)
    x = 3 * torch.randn(37, 700, generator=gen) + 0.5
    a = torch.randn(37, 700, generator=gen).to(out_dtype)
    weight = 1 + torch.randn(700, generator=gen)
    x_k, a_k, w_k = (t.to(DEVICE).requires_grad_() for t in (x, a, weight))
    x64, a64, w64 = (t.double().requires_grad_() for t in (x, a, weight))
    h64 = x64 + a64 if add else x64
    ref = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    if add:
        h, y = add_rms_norm(x_k, a_k, w_k, 1e-5, out_dtype=out_dtype)
        assert h.dtype == torch.float32 and rel_err(h.cpu(), h64.detach()) < 1e-7
    else:
        y = rms_norm(x_k, w_k, 1e-5, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == x.shape
    step = torch.finfo(out_dtype).eps  # one rounding of the float32 value
    assert ((y.cpu().double() - ref.detach()).abs() <= step * ref.detach().abs() + 1e-6).all()
    dy = torch.randn(ref.shape, generator=gen).to(out_dtype)
    dh = torch.randn(ref.shape, generator=gen)
    inputs, inputs64 = ([x_k, a_k, w_k], [x64, a64, w64]) if add else ([x_k, w_k], [x64, w64])
    outputs, outputs64 = ([h, y], [h64, ref]) if add else ([y], [ref])
    grads_out = [dh.to(DEVICE), dy.to(DEVICE)] if add else [dy.to(DEVICE)]
    grads = torch.autograd.grad(outputs, inputs, grads_out)
    grads64 = torch.autograd.grad(outputs64, inputs64, [g.cpu().double() for g in grads_out])
    for grad, grad64, t in zip(grads, grads64, inputs):
        assert grad.dtype == t.dtype
        assert rel_err(grad.cpu(), grad64) < (1e-5 if grad.dtype == torch.float32 else 2 * step)


def test_rms_norm_refuses_what_it_cannot_read():
    from path_lm.path_triton import add_rms_norm, rms_norm

    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(torch.randn(8, 4, device=DEVICE).t(), torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="float64"):
        rms_norm(torch.randn(4, 8, device=DEVICE, dtype=torch.float64), torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="weight \\(7,\\)"):
        rms_norm(torch.randn(4, 8, device=DEVICE), torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="\\(4, 7\\)"):
        add_rms_norm(torch.randn(4, 8, device=DEVICE), torch.randn(4, 7, device=DEVICE), torch.ones(8, device=DEVICE), 1e-6)


def test_model_runs_the_block_norms_through_the_kernel(monkeypatch):
    """Under autocast (CUDA's on a GPU; on a CPU, the CPU's with the kernel forced on in Triton's interpreter) the
    blocks' norms return autocast's dtype from path_triton.rms_norm (the MLP's, with the residual add before it,
    from add_rms_norm), the input projections still run as one product over the cast weights, and the loss,
    logits and every parameter gradient equal the module path's (float32 norms cast by the products) to bf16's
    precision. The final norm keeps float32; without gradients, or without autocast, the norms take PyTorch's
    op; a hook on the MLP's norm gets the module call."""
    from path_lm import modeling_path
    from path_lm.configuration_path import PaTHConfig
    from path_lm.modeling_path import PaTHForCausalLM

    config = PaTHConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_heads=4, intermediate_size=96,
                        use_forget_gate=True, attn_backend="torch", chunk_size=16)
    torch.manual_seed(0)
    model = PaTHForCausalLM(config).to(DEVICE)
    for layer in model.model.layers:
        layer.attn_norm.weight.data.uniform_(0.5, 1.5)
        layer.mlp_norm.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    calls, joint, dtypes = [], [], []
    kernel, joint_weight, usable = modeling_path.rms_norm, modeling_path._joint_weight, modeling_path.rms_norm_usable
    add_kernel = modeling_path.add_rms_norm
    monkeypatch.setattr(modeling_path, "rms_norm", lambda *a, **k: calls.append("norm") or kernel(*a, **k))
    monkeypatch.setattr(modeling_path, "add_rms_norm", lambda *a, **k: calls.append("add") or add_kernel(*a, **k))
    monkeypatch.setattr(modeling_path, "_joint_weight", lambda *a: joint.append(1) or joint_weight(*a))
    if not CUDA:  # (the check itself asks for CUDA autocast)
        monkeypatch.setattr(modeling_path, "rms_norm_usable", lambda x, w: torch.is_autocast_enabled(x.device.type)
                            and torch.is_grad_enabled() and x.dtype == torch.float32)
    model.model.layers[0].attn.register_forward_pre_hook(lambda m, args, kwargs: dtypes.append(args[0].dtype),
                                                         with_kwargs=True)
    results, joint_calls = [], []
    for fused in (False, True):
        for layer in model.model.layers:
            layer.attn_norm.autocast_kernel = layer.mlp_norm.autocast_kernel = fused
        model.zero_grad()
        joint.clear()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        joint_calls.append(len(joint))
        results.append((out.logits.float().detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert calls == ["norm", "add"] * config.num_hidden_layers
    assert dtypes == [torch.float32, torch.bfloat16]
    assert joint_calls[0] >= config.num_hidden_layers and joint_calls[1] == joint_calls[0]  # one product, both ways
    (logits, loss, grads), (logits_k, loss_k, grads_k) = results
    torch.testing.assert_close(logits_k, logits, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(loss_k, loss, atol=1e-2, rtol=1e-2)
    for name in grads:
        assert rel_err(grads_k[name], grads[name]) < 3e-2, name

    calls.clear()
    handle = model.model.layers[0].mlp_norm.register_forward_hook(lambda *a: None)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        model(input_ids=ids)
    handle.remove()
    assert calls == ["norm", "norm", "norm", "add"]
    calls.clear()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        model(input_ids=ids)
    model(input_ids=ids)
    assert not calls
    monkeypatch.setattr(modeling_path, "rms_norm_usable", usable)
