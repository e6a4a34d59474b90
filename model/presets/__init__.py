"""Published `config.json` files of DeepSeek models, so sizing needs no checkpoint download.

Each file is the model's config.json exactly as published on the Hugging Face Hub.
"""

from __future__ import annotations

from pathlib import Path

from model.errors import ConfigError

_HERE = Path(__file__).parent
PRESETS: tuple[str, ...] = tuple(sorted(p.stem for p in _HERE.glob("*.json")))


def preset_path(name: str) -> Path:
    """Path of the preset `name` (e.g. `deepseek-v3`); ConfigError names the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; known: {', '.join(PRESETS)}")
    return _HERE / f"{name}.json"
