"""Registers, spills and shared memory of the decoding kernel, compiled for a GPU target without a GPU.

Compiles `path_triton._decode_kernel` for sm_90 (H100 / H200) with Triton and runs the `ptxas` that Triton
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

ARGS = ("Q K V W BETA GATE MASK N FR RING OP MP LP KN VN GN MN sk_b sk_h sv_b sv_h sg_b sg_h sm_b scale split_len "
        "n_value L").split()
TYPES = dict(Q="*bf16", K="*bf16", V="*bf16", W="*bf16", BETA="*bf16", GATE="*fp32", MASK="*i1", N="*i64",
             FR="*fp32", RING="*fp32", OP="*fp32", MP="*fp32", LP="*fp32", KN="*bf16", VN="*bf16", GN="*fp32",
             MN="*i1", scale="fp32")


def ptxas_report(ptx: str, arch: int) -> dict:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    err = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", f.name, "-o", "/dev/null"],
                         capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", err).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)
    return dict(registers=regs, spill_stores=int(spills.group(1)) if spills else 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    rows = []
    for G in (1, 4):
        GP = 1 if G == 1 else 16
        launches = {pt._decode_launch(64, 64, G, 2**18), pt._decode_launch(64, 64, G, 2**20), (32, 1, 16), (32, 2, 8),
                    (64, 4, 8), (16, 1, 16)}
        for BN, warps, per_sm in sorted(launches):
            consts = dict(H=8, G=G, GP=GP, D=64, DV=64, BN=BN, HAS_GATE=True, HAS_MASK=False, N_ON_DEVICE=True,
                          USE_DOT=G > 1, HAS_FRAMES=True, WINDOW=64, EB=32, WRITE_NEW=True, NEW_MASK=False,
                          FINAL=False, HAS_RING=True)
            signature = {name: TYPES.get(name, "i32") for name in ARGS}
            signature.update({name: "constexpr" for name in consts})
            kernel = triton.compile(ASTSource(fn=pt._decode_kernel, signature=signature, constexprs=consts),
                                    target=target, options=dict(num_warps=warps))
            report = ptxas_report(kernel.asm["ptx"], args.arch)
            per_warp = -(-report["registers"] * 32 // 256) * 256
            resident = 65536 // (per_warp * warps)
            table = "yes" if (BN, warps, per_sm) in {pt._decode_launch(64, 64, G, 2**18), pt._decode_launch(64, 64, G, 2**20)} else ""
            rows.append([G, BN, warps, per_sm, table, report["registers"], report["spill_stores"],
                         kernel.metadata.shared, resident])
    print(f"# _decode_kernel, sm_{args.arch}, head dim 64, bf16 keys with frames and ring, gate, new token written; "
          f"triton {triton.__version__}")
    print(C.markdown_table(["query heads per kv head", "keys per tile", "warps", "programs per SM asked",
                            "in the launch table", "registers per thread", "spill stores (bytes)",
                            "shared memory (bytes)", "programs per SM the registers allow"], rows))


if __name__ == "__main__":
    sys.exit(main())
