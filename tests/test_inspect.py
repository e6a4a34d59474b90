"""`moe inspect`: readable parameter units at any model size, and only meaningful KV comparisons."""

from __future__ import annotations

import json

import pytest

from services.cli import main
from services.cli.inspect import parameter_count


def inspect(capsys, *argv: str) -> str:
    assert main(["inspect", *argv]) == 0
    return capsys.readouterr().out


def row(table: str, name: str) -> str:
    """The value printed beside row `name` (indentation ignored)."""
    (value,) = [line.strip()[len(name):].strip() for line in table.splitlines() if line.strip().startswith(name + "  ")]
    return value


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (0, "0"),
        (576, "576"),
        (1_000, "1.00 K"),
        (248_512, "248.51 K"),
        (999_999, "1.00 M"),
        (114_688_000, "114.69 M"),
        (671_026_419_200, "671.03 B"),
    ],
)
def test_parameter_counts_take_the_largest_unit_they_reach(count, shown):
    assert parameter_count(count) == shown


@pytest.fixture
def demo_sources(v3_checkpoint):
    path, _ = v3_checkpoint
    return {"--model": str(path), "--config": str(path / "config.json")}


@pytest.mark.parametrize("source", ["--model", "--config"])
def test_a_small_model_shows_readable_counts_and_no_gqa_row_wider_than_its_mha(source, demo_sources, capsys):
    table = inspect(capsys, source, demo_sources[source])
    assert row(table, "parameters, total") == "248.51 K"
    assert row(table, "norms") == "448"  # under a thousand: the plain count
    assert "0.00 B" not in table
    # 4 attention heads: 8 KV heads would cache more than MHA, so there is nothing to compare.
    assert row(table, "as MHA").startswith("1,344 bytes")
    assert "GQA" not in table


def test_a_small_models_json_keeps_raw_counts_and_gives_no_gqa_figure(demo_sources, capsys):
    info = json.loads(inspect(capsys, "--model", demo_sources["--model"], "--json"))
    assert info["parameters"]["total"] == 248_512
    assert info["kv_cache_bf16"]["mha_bytes_per_token"] == 1_344
    assert info["kv_cache_bf16"]["gqa8_bytes_per_token"] is None


def test_deepseek_v3_keeps_its_billions_and_its_gqa_comparison(capsys):
    table = inspect(capsys, "--preset", "deepseek-v3")
    for line in ("parameters, total          671.03 B", "  activated per token      36.63 B", "total with MTP             684.49 B",
                 "  as GQA, 8 KV heads       312,320 bytes"):
        assert line in table.splitlines()
    info = json.loads(inspect(capsys, "--preset", "deepseek-v3", "--json"))
    assert info["parameters"]["total"] == 671_026_419_200
    assert info["kv_cache_bf16"]["gqa8_bytes_per_token"] == 312_320
