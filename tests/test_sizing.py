"""`moe size`: the ISCA 2025 paper's arithmetic, what it leaves out, and DeepSeek's production figure."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from model import accounting
from model.config import ModelConfig
from model.presets import preset_path
from services.cli import main
from services.sizing import estimate, load, profiles, values
from services.cli.size import percent
from services.sizing.estimate import PAPER_ASSUMPTIONS, Deployment, size_deployment

VALUES = Path(__file__).parent / "data" / "sizing-values.yaml"
H800, GB200 = profiles.BUILTIN["h800"], profiles.BUILTIN["gb200-nvl72"]


@pytest.fixture(scope="module")
def v3():
    return ModelConfig.from_file(preset_path("deepseek-v3"))


def paper(**overrides) -> Deployment:
    return Deployment(**{**PAPER_ASSUMPTIONS, **overrides})


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---- the paper's own numbers (Insights into DeepSeek-V3, section 2.3.2) -------------------------
def test_paper_infiniband_estimate_with_7k_hidden(v3):
    e = size_deployment(v3, H800, paper(hidden_override=7000))
    assert e.moe_layer.communication_s * 1e6 == pytest.approx(120.96)
    assert e.moe_layer.layer_s * 1e6 == pytest.approx(241.92)
    assert round(e.tpot_s * 1e3, 2) == 14.76
    assert int(e.tokens_per_s_per_user) == 67
    assert e.moe_layer.bound == "communication"


def test_paper_gb200_nvl72_estimate(v3):
    e = size_deployment(v3, GB200, paper(hidden_override=7000, experts_per_gpu=4))  # 64 GPUs: one NVLink domain
    assert e.moe_layer.fabric == "scale-up"
    assert e.moe_layer.communication_s * 1e6 == pytest.approx(6.72)
    assert round(e.tpot_s * 1e3, 2) == 0.82
    assert e.tokens_per_s_per_user == pytest.approx(1200, rel=0.02)  # the paper: "about 1,200"


def test_real_hidden_size_gives_124_us_and_15_1_ms(v3):
    e = size_deployment(v3, H800, paper())
    assert round(e.moe_layer.communication_s * 1e6, 1) == 123.9
    assert round(e.tpot_s * 1e3, 1) == 15.1


def test_cli_paper_mode_reproduces_the_paper_and_reports_inspects_kv_figure(capsys):
    rc, out, _ = run_cli(capsys, "size", "--preset", "deepseek-v3", "--paper", "--hidden-override", "7000", "--json")
    sized = json.loads(out)
    assert rc == 0 and sized["moe_layer"]["communication_s"] == pytest.approx(120.96e-6)
    rc, out, _ = run_cli(capsys, "inspect", "--preset", "deepseek-v3", "--json")
    inspected = json.loads(out)
    cfg = ModelConfig.from_file(preset_path("deepseek-v3"))
    assert sized["kv_bytes_per_token"] == inspected["kv_cache_bf16"]["mla_bytes_per_token"] == accounting.kv_bytes_per_token(cfg) == 70_272


# ---- what the paper leaves out -----------------------------------------------------------------
def test_each_paper_omission_changes_tpot_and_compute_and_latency_slow_it_down(v3):
    costs = estimate.omission_costs(v3, H800, paper())
    assert set(costs) == {k for k, v in PAPER_ASSUMPTIONS.items() if isinstance(v, bool) and v != getattr(Deployment(), k)}
    assert costs["include_latency"] > 1 and costs["include_compute"] > 1 and costs["fp8_scales_on_wire"] > 1
    assert costs["shared_expert_on_wire"] < 1  # a local shared expert takes 1 of 9 copies off the wire


def test_uneven_expert_load_makes_the_slowest_device_bound_the_step(v3):
    uniform = size_deployment(v3, H800, paper())
    skewed = size_deployment(v3, H800, paper(expert_load=(tuple(load.zipf_shares(256, 1.0)),)))
    assert uniform.moe_layer.slowest_device_factor == 1.0
    assert skewed.moe_layer.slowest_device_factor > 2
    assert skewed.tpot_s > uniform.tpot_s


def test_redundant_replicas_of_a_hot_expert_relieve_its_device():
    hot = [10.0] + [1.0] * 15
    assert load.slowest_device_factor(hot, devices=16, slots_per_device=1, redundant=0) == pytest.approx(10 / (25 / 16))
    relieved = load.slowest_device_factor(hot, devices=8, slots_per_device=3, redundant=4)
    assert relieved < 2


def test_expert_load_file_accepts_a_redis_export_per_layer(tmp_path):
    export = tmp_path / "load.json"
    export.write_text(json.dumps({"3": {"0": 40, "5": 10}, "4": {"1": 7}}))
    layers = load.read_load_file(export, n_experts=8)
    assert layers == [[40, 0, 0, 0, 0, 10, 0, 0], [0, 7, 0, 0, 0, 0, 0, 0]]
    export.write_text(json.dumps({"9": 3}))
    with pytest.raises(load.LoadError, match="outside"):
        load.read_load_file(export, n_experts=8)


def test_compute_makes_small_batches_attention_bound_and_sweep_shows_the_tradeoff(v3):
    base = Deployment(ep_width=144, experts_per_gpu=2, redundant_experts=32)
    curve = estimate.sweep(v3, H800, base, "tokens_per_device", [8, 32, 128])
    assert [e.tpot_s for e in curve] == sorted(e.tpot_s for e in curve)
    assert [e.tokens_per_s_per_gpu for e in curve] == sorted(e.tokens_per_s_per_gpu for e in curve)
    assert curve[0].moe_layer.expert_flop_utilisation < curve[-1].moe_layer.expert_flop_utilisation


# ---- DeepSeek's production decode: ~14.8k output tokens/s per H800 node ----------------------------
def test_h800_ep144_production_estimate_lands_within_2_5x_of_14_8k_per_node(v3):
    """EP144 on 18 nodes, 2 routed-expert slots per GPU (256 + 32 redundant), the shared expert and
    attention on every GPU; MTP with 85% acceptance (V3 report: 85-90%); 4,989 KV tokens per
    output token (DeepSeek's day-6 statistics); every worker filled to its memory. The estimate is
    an upper bound: peak network bandwidth, full batches all day, balanced load."""
    deployment = Deployment(ep_width=144, experts_per_gpu=2, redundant_experts=32, mtp_acceptance=0.85, context_length=4989)
    fits = size_deployment(v3, H800, deployment).max_sequences_per_attention_worker
    from services.cli.size import tokens_for_batch

    e = size_deployment(v3, H800, replace(deployment, tokens_per_device=tokens_for_batch(v3, deployment, fits)))
    per_node = e.tokens_per_s_per_gpu * H800.gpus_per_node
    print(f"\nH800 EP144 estimate: {per_node:,.0f} output tokens/s per node vs 14,800 published "
          f"({per_node / 14_800:.2f}x); {e.tokens_per_s_per_user:.1f} tokens/s per user vs 20-22; bound: {e.bound}")
    assert 14_800 <= per_node <= 2.5 * 14_800
    assert 20 <= e.tokens_per_s_per_user <= 1.5 * 22


# ---- inputs: Helm values, profiles, bad flags ------------------------------------------------------
def test_helm_values_become_the_deployment_they_describe(v3, capsys):
    settings = values.deployment_settings(VALUES, v3)
    assert settings["ep_width"] == 34 and settings["experts_per_gpu"] == 8 and settings["redundant_experts"] == 16
    assert settings["planes"] == 2 and settings["attention_workers"] == 4 and settings["kv_cache_tokens"] == 262144
    rc, out, _ = run_cli(capsys, "size", "--preset", "deepseek-v3", "--values", str(VALUES), "--json")
    e = json.loads(out)
    assert rc == 0 and e["gpus"] == 34 + 4
    assert e["sequences_per_attention_worker"] == pytest.approx(64)
    assert e["max_sequences_per_attention_worker"] <= 262144 // 4096


def test_values_with_uncovered_experts_or_bad_ranges_fail_in_one_line(tmp_path, capsys):
    bad = tmp_path / "values.yaml"
    bad.write_text("expertShards:\n  - {name: a, experts: '0-15'}\n")
    rc, _, err = run_cli(capsys, "size", "--preset", "deepseek-v3", "--values", str(bad))
    assert rc == 2 and "240 routed experts are served by no expert shard" in err and err.count("\n") == 1
    with pytest.raises(estimate.DeploymentError, match="bad expert range"):
        values.parse_expert_ids("8-300", 256)


def test_measured_profile_file_round_trips_and_drives_the_estimate(v3, tmp_path):
    measured = {**profiles.BUILTIN["h800"].__dict__, "name": "measured", "scale_out_bandwidth_gb_s": 100.0}
    path = profiles.write_profile(tmp_path / "measured.json", **measured)
    loaded = profiles.load_profile(str(path))
    assert loaded.scale_out_bandwidth_gb_s == 100.0
    assert size_deployment(v3, loaded, paper()).moe_layer.communication_s == pytest.approx(size_deployment(v3, H800, paper()).moe_layer.communication_s / 2)
    with pytest.raises(profiles.ProfileError, match="missing keys"):
        profiles.write_profile(tmp_path / "partial.json", name="x", hbm_bandwidth_gb_s=1.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--profile", "tpu"], "no hardware profile 'tpu'"),
        (["--sweep", "tokens-per-device="], "bad --sweep"),
        (["--sweep", "colour=1,2"], "cannot sweep 'colour'"),
        (["--tokens-per-device", "8", "--attention-batch", "4"], "not both"),
        (["--plot", "x.png"], "--plot draws a --sweep"),
        (["--mtp-acceptance", "1.5"], "MTP acceptance"),
    ],
)
def test_bad_input_is_one_line_error(capsys, argv, message):
    rc, out, err = run_cli(capsys, "size", "--preset", "deepseek-v3", *argv)
    assert rc == 2 and message in err and err.count("\n") == 1 and not out


def test_plot_without_matplotlib_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    rc, _, err = run_cli(capsys, "size", "--preset", "deepseek-v3", "--sweep", "tokens-per-device=8,16", "--plot", str(tmp_path / "c.png"))
    assert rc == 2 and "pip install matplotlib" in err


# ---- what the table warns about ------------------------------------------------------------------
# The 8-plane CI chart's deployment: 16 expert slots on each of 32 GPUs, one attention worker.
EIGHT_PLANES = ("size", "--preset", "deepseek-v3", "--ep-width", "32", "--experts-per-gpu", "16", "--redundant-experts", "256",
                "--planes", "8", "--attention-workers", "1")


def test_a_batch_larger_than_the_kv_cache_holds_is_flagged_in_table_and_json(capsys):
    rc, out, _ = run_cli(capsys, *EIGHT_PLANES, "--attention-batch", "1", "--json")
    room = json.loads(out)["max_sequences_per_attention_worker"]
    assert rc == 0 and room > 1

    rc, out, _ = run_cli(capsys, *EIGHT_PLANES, "--attention-batch", str(room), "--json")
    assert json.loads(out)["batch_fits_kv_cache"] is True
    rc, out, _ = run_cli(capsys, *EIGHT_PLANES, "--attention-batch", str(room))
    assert "WARNING" not in out

    rc, out, _ = run_cli(capsys, *EIGHT_PLANES, "--attention-batch", str(room + 1), "--json")
    assert json.loads(out)["batch_fits_kv_cache"] is False
    rc, out, _ = run_cli(capsys, *EIGHT_PLANES, "--attention-batch", str(room + 1))
    (warning,) = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert f"{room + 1:,}.0 sequences per attention worker, room for {room:,}" in warning


def test_moe_plan_is_moe_size_under_its_former_name(capsys):
    """Users and older docs type `moe plan`: same output, same exit status, errors under the name typed."""
    sized = run_cli(capsys, *EIGHT_PLANES, "--attention-batch", "64")
    assert sized[0] == 0 and run_cli(capsys, "plan", *EIGHT_PLANES[1:], "--attention-batch", "64") == sized
    rc, out, err = run_cli(capsys, "plan", "--preset", "deepseek-v3", "--profile", "tpu")
    assert (rc, out) == (2, "") and err.startswith("moe plan: no hardware profile 'tpu'")


def test_a_batch_fits_by_whole_sequences_despite_float_noise(v3):
    e = size_deployment(v3, H800, Deployment())
    assert replace(e, sequences_per_attention_worker=261.00000000000006, max_sequences_per_attention_worker=261).batch_fits_kv_cache
    # A mean of 260.5 puts 261 sequences on half the workers.
    assert not replace(e, sequences_per_attention_worker=260.5, max_sequences_per_attention_worker=260).batch_fits_kv_cache


@pytest.mark.parametrize(
    ("fraction", "shown"),
    [(0.0, "0%"), (0.0004, "<0.1%"), (0.0047, "0.5%"), (0.0096, "1%"), (0.7, "70%")],
)
def test_a_small_nonzero_share_is_not_printed_as_0_percent(fraction, shown):
    assert percent(fraction) == shown


def test_expert_gemm_utilisation_at_a_small_batch_shows_its_decimal(capsys):
    rc, out, _ = run_cli(capsys, *EIGHT_PLANES, "--attention-batch", "256")
    (gemm,) = [line for line in out.splitlines() if line.strip().startswith("expert GEMM")]
    assert rc == 0 and gemm.endswith("(0.5% of FP8 peak)")
