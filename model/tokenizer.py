"""Optional text front end: a checkpoint's `tokenizer.json`, when it has one."""

from __future__ import annotations

from pathlib import Path

from model.errors import InputError


class TextCodec:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    @classmethod
    def for_model(cls, model_dir: str | Path) -> "TextCodec | None":
        path = Path(model_dir) / "tokenizer.json"
        return cls(path) if path.is_file() else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def delta(self, ids: list[int], new: int) -> str:
        """Text that token `new` adds after `ids` (decoding whole prefixes keeps multi-byte
        characters intact)."""
        return self.decode(ids + [new])[len(self.decode(ids)) :]


def require_codec(model_dir: str | Path) -> TextCodec:
    codec = TextCodec.for_model(model_dir)
    if codec is None:
        raise InputError(f"--prompt needs a tokenizer.json in {model_dir}; pass --prompt-ids instead")
    return codec
