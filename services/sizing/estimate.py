"""Decode-step estimate of an expert-parallel deployment: bytes, times, bound, TPOT, throughput.

Units: seconds and bytes inside, microseconds in the report. One "device" is one expert-parallel
GPU; T (`tokens_per_device`) is how many positions each of them takes per micro-batch. With
two-micro-batch overlap each step runs two micro-batches whose compute hides the other's
communication, so a layer costs 2 x max(communication, compute); without it, their sum.

The ISCA 2025 paper's arithmetic (section 2.3.2) is `PAPER_ASSUMPTIONS`: every one of its
simplifications is a field here, so each can be switched back on and its cost read off.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from model import accounting
from model.config import ModelConfig
from model.errors import ModelError
from services.sizing.load import slowest_device_factor
from services.sizing.profiles import HardwareProfile
from services.wire.dtypes import VALUE_BYTES, hidden_bytes_per_token
MEMORY_RESERVE = 0.10  # of HBM kept for activations, workspaces and fragmentation


class DeploymentError(ModelError):
    """A deployment that cannot be sized (inconsistent counts, unknown dtype)."""


@dataclass(frozen=True)
class Deployment:
    tokens_per_device: float = 32  # positions per EP device per micro-batch
    experts_per_gpu: int = 1  # routed-expert slots per EP device (redundant ones included)
    redundant_experts: int = 0
    ep_width: int | None = None  # EP devices; None: just enough slots for all experts
    planes: int = 1  # network planes; a copy crossing planes takes an extra NVLink hop
    max_nodes_per_token: int | None = None  # node-limited routing: copies leaving the node
    dispatch_dtype: str = "fp8"
    combine_dtype: str = "bf16"
    two_micro_batch: bool = True
    attention_workers: int | None = None  # None: attention runs on every EP device (DeepSeek)
    attention_gpus_per_worker: int = 1
    context_length: int = 4096  # KV tokens each sequence attends to
    kv_cache_tokens: int | None = None  # a worker's KV pool size when it is capped (Helm values)
    mtp_acceptance: float | None = None  # None: no MTP; else acceptance of the drafted token
    hidden_override: int | None = None  # width on the wire (the paper rounds 7168 to "7K")
    kernel_efficiency: float = 0.7  # fraction of HBM and tensor-core peaks real kernels reach
    expert_load: tuple[tuple[float, ...], ...] = ()  # per MoE layer token counts; () uniform
    # What the paper's estimate leaves out; PAPER_ASSUMPTIONS switches these off.
    shared_expert_on_wire: bool = False  # True: the shared expert is dispatched like a routed one
    include_latency: bool = True
    include_compute: bool = True  # attention, expert GEMMs, dense layers and the LM head
    dense_layers_separate: bool = True  # False: every layer costs a MoE layer
    fp8_scales_on_wire: bool = True
    local_copies_skip_network: bool = True  # copies to GPUs of the same node ride NVLink


PAPER_ASSUMPTIONS = dict(
    tokens_per_device=32,
    experts_per_gpu=1,
    dispatch_dtype="fp8",
    combine_dtype="bf16",
    two_micro_batch=True,
    shared_expert_on_wire=True,
    include_latency=False,
    include_compute=False,
    dense_layers_separate=False,
    fp8_scales_on_wire=False,
    local_copies_skip_network=False,
)


@dataclass(frozen=True)
class MoeLayer:
    """One MoE layer on the slowest device, one micro-batch."""

    dispatch_bytes_per_token: float
    combine_bytes_per_token: float
    fabric: str  # "scale-out" or "scale-up"
    slowest_device_factor: float
    communication_s: float
    attention_s: float  # MLA (+ shared expert when local) on an attention worker
    expert_gemm_s: float  # routed experts on the slowest EP device
    expert_flop_utilisation: float
    layer_s: float  # both micro-batches (or the one)
    bound: str  # "communication", "attention" or "expert GEMM"


@dataclass(frozen=True)
class Estimate:
    deployment: Deployment
    profile: str
    gpus: int
    ep_width: int
    moe_layer: MoeLayer  # the slowest MoE layer
    moe_layers_in_step: int
    dense_layers_in_step: int
    dense_layer_s: float
    head_s: float
    step_s: float
    tokens_per_sequence_per_step: float
    sequences_per_attention_worker: float
    tpot_s: float
    tokens_per_s_per_user: float
    tokens_per_s_per_gpu: float
    kv_bytes_per_token: int
    max_sequences_per_attention_worker: int
    bound: str

    @property
    def batch_fits_kv_cache(self) -> bool:
        """Whether every attention worker's sequences fit its KV cache. A fractional mean means some
        workers hold one sequence more; rounding first drops the float noise the batch picks up
        on its way through tokens_per_device."""
        return math.ceil(round(self.sequences_per_attention_worker, 6)) <= self.max_sequences_per_attention_worker

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["batch_fits_kv_cache"] = self.batch_fits_kv_cache
        out["deployment"]["expert_load"] = f"{len(self.deployment.expert_load)} layers" if self.deployment.expert_load else "uniform"
        return out


def size_deployment(cfg: ModelConfig, profile: HardwareProfile, deployment: Deployment) -> Estimate:
    d = _checked(cfg, deployment)
    ep = d.ep_width or math.ceil((cfg.n_routed_experts + d.redundant_experts) / d.experts_per_gpu)
    micro_batches = 2 if d.two_micro_batch else 1
    positions_per_sequence = 1 + (cfg.num_nextn_predict_layers if d.mtp_acceptance is not None else 0)
    workers = d.attention_workers or ep
    sequences = d.tokens_per_device * ep * micro_batches / positions_per_sequence
    per_worker = sequences / workers

    layers = [_moe_layer(cfg, profile, d, ep, workers, factor) for factor in _device_factors(cfg, d, ep)]
    moe_layers = len(cfg.moe_layers) if d.dense_layers_separate else cfg.num_hidden_layers
    dense_layers = cfg.num_hidden_layers - moe_layers
    moe_total = sum(layer.layer_s for layer in layers) * moe_layers / len(layers)
    mtp_layers = positions_per_sequence - 1
    slowest = max(layers, key=lambda layer: layer.layer_s)
    dense_s = _dense_layer_s(cfg, profile, d, per_worker / micro_batches * positions_per_sequence) * micro_batches
    head_s = _head_s(cfg, profile, d) * micro_batches * positions_per_sequence
    step_s = moe_total * (1 + mtp_layers / moe_layers) + dense_layers * dense_s + head_s

    tokens_per_step = 1 + (d.mtp_acceptance or 0.0) * mtp_layers
    tpot = step_s / tokens_per_step
    attention_gpus = 0 if d.attention_workers is None else workers * d.attention_gpus_per_worker
    gpus = ep + attention_gpus
    kv_per_token = accounting.kv_bytes_per_token(cfg)
    return Estimate(
        deployment=d,
        profile=profile.name,
        gpus=gpus,
        ep_width=ep,
        moe_layer=slowest,
        moe_layers_in_step=moe_layers + mtp_layers,
        dense_layers_in_step=dense_layers,
        dense_layer_s=dense_s,
        head_s=head_s,
        step_s=step_s,
        tokens_per_sequence_per_step=tokens_per_step,
        sequences_per_attention_worker=per_worker,
        tpot_s=tpot,
        tokens_per_s_per_user=1 / tpot,
        tokens_per_s_per_gpu=sequences / tpot / gpus,
        kv_bytes_per_token=kv_per_token,
        max_sequences_per_attention_worker=max_sequences_per_worker(cfg, profile, d, kv_per_token),
        bound=slowest.bound,
    )


def sweep(cfg: ModelConfig, profile: HardwareProfile, deployment: Deployment, field: str, values: list[float]) -> list[Estimate]:
    if field not in Deployment.__dataclass_fields__:
        raise DeploymentError(f"cannot sweep '{field}': not a deployment setting")
    return [size_deployment(cfg, profile, replace(deployment, **{field: value})) for value in values]


def max_sequences_per_worker(cfg: ModelConfig, profile: HardwareProfile, d: Deployment, kv_per_token: int) -> int:
    """Sequences of `context_length` whose latent KV cache fits beside the worker's weights."""
    memory = profile.gpu_memory_gb * 1e9 * d.attention_gpus_per_worker * (1 - MEMORY_RESERVE)
    free = memory - _attention_worker_weight_bytes(cfg, d)
    by_memory = max(0, int(free // (d.context_length * kv_per_token)))
    if d.kv_cache_tokens is not None:
        return min(by_memory, d.kv_cache_tokens // d.context_length)
    return by_memory


# ---- one MoE layer ------------------------------------------------------------------------------
def _moe_layer(cfg: ModelConfig, profile: HardwareProfile, d: Deployment, ep: int, workers: int, factor: float) -> MoeLayer:
    hidden = d.hidden_override or cfg.hidden_size
    shared_copies = cfg.n_shared_experts if d.shared_expert_on_wire else 0
    copies = cfg.num_experts_per_tok + shared_copies
    dispatch_per_token = float(copies * hidden_bytes_per_token(hidden, d.dispatch_dtype, with_scales=d.fp8_scales_on_wire))
    combine_per_token = copies * hidden * VALUE_BYTES[d.combine_dtype]
    # The slowest device receives `factor` times the mean of the routed copies.
    received = (cfg.num_experts_per_tok * factor + shared_copies) / copies
    fabric, communication = _all_to_all_s(profile, d, ep, d.tokens_per_device * received * (dispatch_per_token + combine_per_token), copies)

    positions_per_worker = d.tokens_per_device * ep / workers
    attention = _mla_s(cfg, profile, d, positions_per_worker)
    if not d.shared_expert_on_wire:
        shared = accounting.shared_expert_parameters(cfg)
        attention += _gemm_s(cfg, profile, d, shared, 2 * shared * positions_per_worker)
    routed_tokens = d.tokens_per_device * cfg.num_experts_per_tok * factor  # each through one expert
    flops = 2 * accounting.routed_expert_parameters(cfg) * routed_tokens
    expert_gemm = _gemm_s(cfg, profile, d, accounting.routed_expert_parameters(cfg) * d.experts_per_gpu, flops)
    if not d.include_compute:
        attention = expert_gemm = 0.0
    utilisation = flops / (expert_gemm * profile.fp8_tflops * 1e12) if expert_gemm else 0.0

    colocated = d.attention_workers is None
    compute = attention + expert_gemm if colocated else max(attention, expert_gemm)
    layer_s = 2 * max(communication, compute) if d.two_micro_batch else communication + attention + expert_gemm
    parts = {"communication": communication, "attention": attention, "expert GEMM": expert_gemm}
    return MoeLayer(
        dispatch_bytes_per_token=dispatch_per_token,
        combine_bytes_per_token=combine_per_token,
        fabric=fabric,
        slowest_device_factor=factor,
        communication_s=communication,
        attention_s=attention,
        expert_gemm_s=expert_gemm,
        expert_flop_utilisation=utilisation,
        layer_s=layer_s,
        bound=max(parts, key=parts.get),
    )


def _all_to_all_s(profile: HardwareProfile, d: Deployment, ep: int, bytes_per_device: float, copies: int) -> tuple[str, float]:
    """Dispatch + combine time on one device: the busier link, plus a hop latency each way."""
    scale_up_bw = profile.scale_up_bandwidth_gb_s * 1e9
    if ep <= profile.scale_up_domain_gpus:
        on_wire = bytes_per_device * ((1 - 1 / ep) if d.local_copies_skip_network else 1)
        latency = 2 * profile.scale_up_latency_us * 1e-6 if d.include_latency else 0.0
        return "scale-up", on_wire / scale_up_bw + latency
    same_node = min(profile.gpus_per_node, ep) / ep if d.local_copies_skip_network else 0.0
    leaving = 1 - same_node
    if d.max_nodes_per_token is not None:
        # One copy per destination node leaves; the node forwards the rest over NVLink.
        leaving = min(leaving, d.max_nodes_per_token / copies)
    cross_plane = leaving * (d.planes - 1) / d.planes
    scale_out_bytes = bytes_per_device * leaving
    scale_up_bytes = bytes_per_device * (1 - leaving + cross_plane)
    hop = profile.scale_out_latency_us + (profile.scale_up_latency_us if d.planes > 1 or d.max_nodes_per_token else 0)
    latency = 2 * hop * 1e-6 if d.include_latency else 0.0
    seconds = max(scale_out_bytes / (profile.scale_out_bandwidth_gb_s * 1e9), scale_up_bytes / scale_up_bw)
    return "scale-out", seconds + latency


def _roofline_s(profile: HardwareProfile, d: Deployment, bytes_read: float, flops: float, tflops: float) -> float:
    memory = bytes_read / (profile.hbm_bandwidth_gb_s * 1e9 * d.kernel_efficiency)
    compute = flops / (tflops * 1e12 * d.kernel_efficiency)
    return max(memory, compute)


def _gemm_s(cfg: ModelConfig, profile: HardwareProfile, d: Deployment, weights_read: float, flops: float) -> float:
    """FP8 GEMMs that read `weights_read` parameters once: at decode batch sizes the read wins."""
    return _roofline_s(profile, d, weights_read * accounting.linear_weight_bytes(cfg), flops, profile.fp8_tflops)


def _mla_s(cfg: ModelConfig, profile: HardwareProfile, d: Deployment, positions: float) -> float:
    """Absorbed MLA decode for `positions` queries: projections plus a pass over the latent cache
    (scores over kv_lora_rank + rope, values over kv_lora_rank, per head), in BF16."""
    params = accounting.attention_parameters(cfg)
    kv_bytes = positions * d.context_length * accounting.kv_bytes_per_token_per_layer(cfg)
    core_flops = positions * d.context_length * 2 * cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    weights = params * accounting.linear_weight_bytes(cfg)
    return _roofline_s(profile, d, weights + kv_bytes, 2 * params * positions + core_flops, profile.bf16_tflops)


def _dense_layer_s(cfg: ModelConfig, profile: HardwareProfile, d: Deployment, positions: float) -> float:
    if not d.include_compute:
        return 0.0
    mlp = accounting.dense_mlp_parameters(cfg)
    return _mla_s(cfg, profile, d, positions) + _gemm_s(cfg, profile, d, mlp, 2 * mlp * positions)


def _head_s(cfg: ModelConfig, profile: HardwareProfile, d: Deployment) -> float:
    """One pass of the BF16 LM head per micro-batch (its weight read dominates at decode)."""
    if not d.include_compute:
        return 0.0
    return cfg.vocab_size * cfg.hidden_size * accounting.BF16 / (profile.hbm_bandwidth_gb_s * 1e9 * d.kernel_efficiency)


def _attention_worker_weight_bytes(cfg: ModelConfig, d: Deployment) -> float:
    counts = accounting.parameter_counts(cfg)
    by = counts.by_category
    expert = accounting.routed_expert_parameters(cfg)
    linear = by["attention"] + by["dense_mlp"] + by["shared_experts"]
    moe_layers = len(cfg.moe_layers)
    if d.mtp_acceptance is not None:  # the MTP modules, less their routed experts (sharded below)
        linear += counts.mtp_unique - cfg.num_nextn_predict_layers * cfg.n_routed_experts * expert
        moe_layers += cfg.num_nextn_predict_layers
    if d.attention_workers is None:  # co-located: this GPU also holds its routed-expert slots
        linear += d.experts_per_gpu * moe_layers * expert
    bf16 = by["embedding"] + by["lm_head"] + by["router"] + by["norms"]
    return (linear * accounting.linear_weight_bytes(cfg) + bf16 * accounting.BF16) / d.attention_gpus_per_worker


def _device_factors(cfg: ModelConfig, d: Deployment, ep: int) -> list[float]:
    loads = d.expert_load or ((1.0,) * cfg.n_routed_experts,)
    factors = {tuple(load): slowest_device_factor(list(load), ep, d.experts_per_gpu, d.redundant_experts) for load in loads}
    return [factors[tuple(load)] for load in loads]


def _checked(cfg: ModelConfig, d: Deployment) -> Deployment:
    for name in ("dispatch_dtype", "combine_dtype"):
        if getattr(d, name) not in VALUE_BYTES:
            raise DeploymentError(f"{name.replace('_', ' ')} '{getattr(d, name)}' is not one of {', '.join(VALUE_BYTES)}")
    positive = ("tokens_per_device", "experts_per_gpu", "planes", "attention_gpus_per_worker", "context_length")
    for name in positive:
        if getattr(d, name) <= 0:
            raise DeploymentError(f"{name.replace('_', ' ')} must be positive, got {getattr(d, name)}")
    if not 0 < d.kernel_efficiency <= 1:
        raise DeploymentError(f"kernel efficiency must lie in (0, 1], got {d.kernel_efficiency}")
    if d.mtp_acceptance is not None and not (cfg.num_nextn_predict_layers and 0 <= d.mtp_acceptance <= 1):
        raise DeploymentError("MTP acceptance needs a model with MTP modules and a value in [0, 1]")
    if d.redundant_experts < 0:
        raise DeploymentError(f"redundant experts must be >= 0, got {d.redundant_experts}")
    if any(len(load) != cfg.n_routed_experts for load in d.expert_load):
        raise DeploymentError(f"expert load must give {cfg.n_routed_experts} experts per layer")
    return d


def omission_costs(cfg: ModelConfig, profile: HardwareProfile, deployment: Deployment) -> dict[str, float]:
    """For each paper simplification `deployment` makes: TPOT with it undone over TPOT as given."""
    base = size_deployment(cfg, profile, deployment).tpot_s
    defaults = Deployment()
    costs = {}
    for name, value in PAPER_ASSUMPTIONS.items():
        default = getattr(defaults, name)
        if isinstance(default, bool) and getattr(deployment, name) != default:
            costs[name] = size_deployment(cfg, profile, replace(deployment, **{name: default})).tpot_s / base
    return costs
