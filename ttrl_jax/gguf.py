"""`python -m ttrl_jax.gguf FILE.gguf OUT_DIR`: a GGUF checkpoint (llama.cpp's single-file
format) written as an ordinary Hugging Face model folder that ttrl_jax and transformers load.

The conversion is ttrl_jax/hf/gguf.py's `convert`; a `.gguf` file given as a run's model is
converted there once, into a cache folder, without this command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ttrl_jax.hf import gguf as hf_gguf
from ttrl_jax.hf import layout as hf_layout


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: convert a GGUF file into an HF model folder."""
    ap = argparse.ArgumentParser(prog="python -m ttrl_jax.gguf", description=__doc__)
    ap.add_argument("gguf_file", help="a .gguf file (llama, qwen2 or qwen3)")
    ap.add_argument("out_dir", help="the HF folder to write")
    ap.add_argument("--dtype", default="float32", choices=hf_layout.SAVE_DTYPES)
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = ap.parse_args(argv)
    try:
        out = hf_gguf.convert(
            args.gguf_file, args.out_dir, dtype=args.dtype, overwrite=args.overwrite
        )
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(out)
    return out


if __name__ == "__main__":
    main()
