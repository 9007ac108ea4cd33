"""Registers, spills and shared memory of the decoding kernel, compiled for a GPU target without a GPU.

Compiles the decoding kernels (`path_triton._decode_framed_kernel` and `_decode_kernel`) for sm_90 (H100 / H200) with Triton and runs the `ptxas` that Triton
ships on its PTX (`ptxas -v`), for the launch configurations of `path_triton._decode_launch` and a few
others, at head dim 64 with and without grouped query heads and with every feature of a bf16 model's
compiled step on (frames, the float32 ring, the gate, the new token written by the kernel). Prints
registers per thread, spills, shared memory and the programs per SM that the registers allow (65536
registers per SM, allocated per warp in units of 256), beside the programs per SM the launch asks for.

    python benchmarks/decode_registers.py [--arch 90]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C  # noqa: F401  (puts the repository on the path)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from path_lm import path_triton as pt

ARGS = ("Q K V W BETA GATE MASK N FR RING OP MP LP KN VN GN MN QO sk_b sk_h sv_b sv_h sg_b sg_h sm_b scale split_len "
        "n_value L parts").split()
FRAMED_ARGS = "QO K V GATE MASK N OP MP LP sk_b sk_h sv_b sv_h sg_b sg_h sm_b scale split_len n_value parts L".split()
TYPES = dict(Q="*bf16", K="*bf16", V="*bf16", W="*bf16", BETA="*bf16", GATE="*fp32", MASK="*i1", N="*i64",
             FR="*fp32", RING="*fp32", OP="*fp32", MP="*fp32", LP="*fp32", KN="*bf16", VN="*bf16", GN="*fp32",
             MN="*i1", QO="*fp32", scale="fp32")


def ptxas_report(ptx: str, arch: int) -> dict:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    err = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", f.name, "-o", "/dev/null"],
                         capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", err).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)
    return dict(registers=regs, spill_stores=int(spills.group(1)) if spills else 0)


def compile_report(fn, names, consts, warps, arch) -> dict:
    signature = {name: TYPES.get(name, "i32") for name in names}
    signature.update({name: "constexpr" for name in consts})
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=warps))
    report = ptxas_report(kernel.asm["ptx"], arch)
    per_warp = -(-report["registers"] * 32 // 256) * 256  # registers are allocated per warp in units of 256
    return dict(report, shared=kernel.metadata.shared, resident=65536 // (per_warp * warps))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    rows = []
    for G in (1, 4):
        GP = 1 if G == 1 else 16
        shape = dict(H=8, G=G, GP=GP, D=64, DV=64, HAS_GATE=True, HAS_MASK=True, N_ON_DEVICE=True, USE_DOT=G > 1,
                     WINDOW=64)
        table = pt._decode_launch(64, 64, G, 2**20)
        for BN, warps, per_sm in sorted({table, (16, 1, 16), (32, 2, 8), (64, 1, 16), (64, 2, 8)}):
            runs = [("framed keys (_decode_framed_kernel)", pt._decode_framed_kernel, FRAMED_ARGS, dict(shape, BN=BN), warps),
                    ("single launch (_decode_kernel)", pt._decode_kernel, ARGS,
                     dict(shape, BN=BN, HAS_FRAMES=True, EB=32, WRITE_NEW=True, NEW_MASK=True, FINAL=False, HAS_RING=True,
                          FRAMED_ELSEWHERE=False), warps)]
            if (BN, warps, per_sm) == table:  # the window's launch: one program per (row, head), 4 warps
                runs.append(("window and new token (_decode_kernel)", pt._decode_kernel, ARGS,
                             dict(shape, BN=BN, HAS_FRAMES=True, EB=32, WRITE_NEW=True, NEW_MASK=True, FINAL=False,
                                  HAS_RING=True, FRAMED_ELSEWHERE=True), 4))
            for name, fn, names, consts, run_warps in runs:
                r = compile_report(fn, names, consts, run_warps, args.arch)
                rows.append([name, G, BN, run_warps, per_sm if run_warps == warps else 1, "yes" if (BN, warps, per_sm) == table else "",
                             r["registers"], r["spill_stores"], r["shared"], r["resident"]])
    print(f"# decoding kernels with frames, sm_{args.arch}, head dim 64, bf16 keys, float32 ring, gate, padding mask, new "
          f"token written, slot on the device; triton {triton.__version__}")
    print(C.markdown_table(["kernel", "query heads per kv head", "keys per tile", "warps", "programs per SM asked",
                            "in the launch table", "registers per thread", "spill stores (bytes)",
                            "shared memory (bytes)", "programs per SM the registers allow"], rows))


if __name__ == "__main__":
    sys.exit(main())
