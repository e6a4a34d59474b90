"""Hardware-specific compute behind the readable model, chosen once: when a model or a bank of
experts is loaded (model/checkpoint.py), or when a decoder builds its graphs.

model/ computes everything the plain way. What a backend does faster is installed from here:

- Expert compute: a function `(bank, x [T, D], ids [T, K], weights [T, K]) -> [T, D]` set as
  `ExpertBank.compute` (`ExpertBank.reference` until then). `expert_compute` picks it:
  cuda.grouped_experts (sync-free grouped GEMMs, FP8 ones for FP8 banks) on CUDA and for banks
  that absorbed shared experts or hold FP8 weights, cpu.sorted_experts for eager CPU steps;
  cpu.pair_experts stands in while a compiled CPU decode graph is traced.
- Weights: on CUDA the shared experts join the routed ones in their bank (one grouped GEMM each).
- Module classes: on CPU the LM head becomes cpu.PackedLMHead (oneDNN-prepacked weight), and
  while a decode graph is traced (cpu.compiled_variants) linears and head stream their weights.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from model.kernels import cpu, cuda
from model.kernels.fp8_gemm import fp8_grouped_mm_available
from model.moe import ExpertBank, MoE

ExpertCompute = Callable[[ExpertBank, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def expert_compute(bank: ExpertBank, device: torch.device | str) -> ExpertCompute:
    """The eager compute for `bank` on `device` (compiled CPU graphs swap in `cpu.pair_experts`)."""
    device = torch.device(device)
    if bank.is_fp8 and not fp8_grouped_mm_available(device):
        raise ValueError(f"FP8 expert GEMMs need Triton and a CUDA device of compute capability 8.9+ (got {device})")
    if device.type == "cuda" or bank.is_fp8 or bank.shared_slots:
        return cuda.grouped_experts
    return cpu.sorted_experts


def install(model: nn.Module, device: torch.device | str) -> None:
    """Choose every kernel of a loaded model (or a single `ExpertBank`) for `device`; a model
    moved to another device afterwards needs another call. On CUDA the shared experts join the
    routed ones in their bank first, so one grouped GEMM per projection serves both
    (`MoE.absorb_shared_into_experts`)."""
    if torch.device(device).type == "cuda":
        for module in model.modules():
            if isinstance(module, MoE):
                module.absorb_shared_into_experts()
    for module in model.modules():
        if isinstance(module, ExpertBank):
            module.compute = expert_compute(module, device)
    cpu.install(model, on_cpu=torch.device(device).type == "cpu")
