"""What ships with the tool: the recipes under `configs/` (tiny, small, ... each a pipeline YAML
and one YAML per stage) and the ranked answers under `reward_data/`.

In a checkout they are the top-level directories. A wheel carries copies of them as package data
under `pipeline/_presets/` (setup.py's build step copies them), so `rlhf pipeline run tiny` works
after `pip install` from any directory. The top-level directories stay the one source.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError

PACKAGED = Path(__file__).parent / "_presets"
PIPELINE_FILE = "pipeline.yaml"


def shipped_root() -> Path:
    """The directory holding `configs/` and `reward_data/`: the wheel's copy, else the checkout."""
    return PACKAGED if PACKAGED.is_dir() else Path(__file__).resolve().parents[1]


def preset_names() -> list[str]:
    """The recipes that have a pipeline YAML, e.g. ["small", "tiny"]."""
    configs = shipped_root() / "configs"
    return sorted(path.parent.name for path in configs.glob(f"*/{PIPELINE_FILE}"))


def pipeline_source(name_or_path: str) -> tuple[Path, Path | None]:
    """The pipeline YAML a `rlhf pipeline run` argument names, and the directory its relative
    stage config paths start from: a file as given (the working directory), or a preset name
    (the shipped root, whose pipeline YAMLs name `configs/NAME/STAGE.yaml`)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix or "/" in name_or_path:
        return path, None
    if name_or_path in preset_names():
        return shipped_root() / "configs" / name_or_path / PIPELINE_FILE, shipped_root()
    raise UserError(f"{name_or_path}: no such file, and not a preset (presets: "
                    f"{', '.join(preset_names())}); pass a pipeline YAML or a preset name")
