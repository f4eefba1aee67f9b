"""Per-module activation and gradient monitoring with hooks, and naming the first module that went non-finite.

    with ModuleMonitor(model) as monitor:                    # registers the hooks
        for step, batch in enumerate(loader):
            monitor.begin_step(step, loss_scale=scaler.get_scale() if scaler.is_enabled() else 1.0)
            train_step(model, batch, optimizer, scaler, runtime, after_unscale=monitor.read_gradients)
            if monitor.first_non_finite() is not None:
                print(monitor.first_non_finite().describe())
                break
                                                             # leaving the block removes every hook
Without a monitor nothing is registered, so a training loop pays nothing for this module existing.

What is recorded per step and module (`rows()`):
- activations: largest finite |value|, mean of the finite values, fraction of non-finite values of the output;
- `out_grad_norm`: L2 norm of the gradient w.r.t. the module's output, divided by the loss scale (true size);
- `grad_norm`: L2 norm of the module's own parameters' gradients, read after `GradScaler.unscale_` (true size).

A non-finite forward output is always an error. A non-finite gradient while the loss scale is above 1 may be
an artefact of the scaling (the GradScaler then skips the step and halves the scale): it is recorded in
`overflows`, not as an error. At a scale of 1 or below the true gradient is at least as large as the stored
one, so an overflow there is real and is reported by `first_non_finite()`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

ROOT_NAME = "(model)"  # how the model itself (named "" by named_modules) appears in reports


@dataclass
class TensorStats:
    shape: tuple[int, ...]
    dtype: str
    max_abs: float  # largest |value| among the finite values (0.0 when none is finite)
    mean: float  # mean of the finite values (nan when none is finite)
    non_finite: float  # fraction of NaN/inf values

    def describe(self) -> str:
        return (f"{self.dtype}{list(self.shape)} max|x|={self.max_abs:.4g} mean={self.mean:.4g} "
                f"non-finite={self.non_finite:.1%}")


@torch.no_grad()
def tensor_stats(tensor: torch.Tensor) -> TensorStats:
    values = tensor.detach().float()
    finite = torch.isfinite(values)
    n_finite = int(finite.sum())
    if n_finite == values.numel():
        max_abs = values.abs().max().item() if values.numel() else 0.0
        mean = values.mean().item() if values.numel() else math.nan
    else:
        kept = values[finite]
        max_abs = kept.abs().max().item() if n_finite else 0.0
        mean = kept.mean().item() if n_finite else math.nan
    return TensorStats(tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""), max_abs, mean,
                       1.0 - n_finite / max(1, values.numel()))


def floating_tensors(value: object) -> list[torch.Tensor]:
    """The floating-point tensors inside a module's inputs or outputs (tensors, tuples, lists, dicts)."""
    if torch.is_tensor(value):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in floating_tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in floating_tensors(item)]
    return []


@dataclass
class NonFiniteEvent:
    """The first place where a NaN or inf appeared."""

    step: int
    phase: str  # "forward" (the module's output), "backward" (gradient w.r.t. its output), "parameter gradient"
    module: str  # path in the model, e.g. "fusion.blocks.2.operator"
    module_type: str
    inputs: list[TensorStats] = field(default_factory=list)
    outputs: list[TensorStats] = field(default_factory=list)
    gradients: list[TensorStats] = field(default_factory=list)
    produced_by: str | None = None  # backward: the module whose backward ran just before (it made the gradient)

    @property
    def inputs_finite(self) -> bool:
        return all(s.non_finite == 0 for s in self.inputs)

    def describe(self) -> str:
        lines = [f"first non-finite value: step {self.step}, {self.phase} of {self.module} ({self.module_type})"]
        if self.phase == "forward":
            cause = ("its inputs were finite, so this module produced it" if self.inputs_finite
                     else "its inputs were already non-finite (look at the data)")
            lines.append(f"  {cause}")
        if self.produced_by:
            lines.append(f"  the gradient came out of the backward of {self.produced_by}")
        for label, group in (("input", self.inputs), ("output", self.outputs), ("gradient", self.gradients)):
            lines += [f"  {label} {i}: {s.describe()}" for i, s in enumerate(group)]
        return "\n".join(lines)


class ModuleMonitor:
    """Forward hooks and output-gradient hooks on every module of `model`; see the module docstring.

    `modules` restricts the monitored modules to those whose path starts with one of the given prefixes.
    """

    def __init__(self, model: nn.Module, modules: tuple[str, ...] | None = None):
        self.model = model
        self.names = {module: name or ROOT_NAME for name, module in model.named_modules()
                      if modules is None or any(name.startswith(prefix) for prefix in modules)}
        self.handles: list[RemovableHandle] = []
        self.step = 0
        self.loss_scale = 1.0
        self.records: dict[int, dict[str, dict]] = {}  # step -> module path -> statistics
        self.overflows: dict[int, str] = {}  # step -> first module with a (possibly scaling-made) overflow
        self.event: NonFiniteEvent | None = None
        self._last_finite_grad: str | None = None

    # -- registration -------------------------------------------------------------------------------------------
    def attach(self) -> "ModuleMonitor":
        if self.handles:
            raise RuntimeError("ModuleMonitor is already attached")
        for module, name in self.names.items():
            self.handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def remove(self) -> None:
        """Remove every hook this monitor registered; the records stay readable."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> "ModuleMonitor":
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    # -- per step -----------------------------------------------------------------------------------------------
    def begin_step(self, step: int, loss_scale: float = 1.0) -> None:
        """Start recording `step`; `loss_scale` is the GradScaler's scale of this step (1.0 without one)."""
        self.step, self.loss_scale = step, float(loss_scale)
        self.records.setdefault(step, {})
        self._last_finite_grad = None

    def _record(self, name: str) -> dict:
        return self.records.setdefault(self.step, {}).setdefault(name, {})

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            tensors = floating_tensors(output)
            if not tensors:
                return
            stats = [tensor_stats(t) for t in tensors]
            record = self._record(name)
            record["type"] = type(module).__name__
            # A module called several times in a step (shared layers) keeps its extremes.
            record["act_max_abs"] = max([record.get("act_max_abs", 0.0)] + [s.max_abs for s in stats])
            record["act_mean"] = stats[0].mean
            record["act_non_finite"] = max([record.get("act_non_finite", 0.0)] + [s.non_finite for s in stats])
            if self.event is None and any(s.non_finite for s in stats):
                self.event = NonFiniteEvent(self.step, "forward", name, type(module).__name__,
                                            inputs=[tensor_stats(t) for t in floating_tensors(inputs)],
                                            outputs=stats)
            if torch.is_grad_enabled():
                for tensor in tensors:
                    if tensor.requires_grad:
                        tensor.register_hook(self._gradient_hook(name, type(module).__name__, stats))
        return hook

    def _gradient_hook(self, name: str, module_type: str, output_stats: list[TensorStats]):
        step = self.step

        def hook(grad: torch.Tensor) -> None:
            true_grad = grad.detach().float() / self.loss_scale
            norm = torch.linalg.vector_norm(true_grad).item()
            record = self.records[step].setdefault(name, {})
            record["out_grad_norm"] = math.sqrt(record.get("out_grad_norm", 0.0) ** 2 + norm ** 2)
            if math.isfinite(norm):
                self._last_finite_grad = name
                return
            if self.loss_scale > 1.0:
                self.overflows.setdefault(step, name)
            elif self.event is None:
                self.event = NonFiniteEvent(step, "backward", name, module_type, outputs=output_stats,
                                            gradients=[tensor_stats(true_grad)],
                                            produced_by=self._last_finite_grad)
        return hook

    @torch.no_grad()
    def read_gradients(self) -> None:
        """Record each module's own parameter-gradient norm. Call it after `GradScaler.unscale_`
        (`train_step(..., after_unscale=monitor.read_gradients)`), so the norms are the true, unscaled ones."""
        for module, name in self.names.items():
            grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
            if not grads:
                continue
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
            record = self._record(name)
            record["type"] = type(module).__name__
            record["grad_norm"] = norm
            if math.isfinite(norm):
                continue
            if self.loss_scale > 1.0:
                self.overflows.setdefault(self.step, name)
            elif self.event is None:
                self.event = NonFiniteEvent(self.step, "parameter gradient", name, type(module).__name__,
                                            gradients=[tensor_stats(g) for g in grads])

    # -- results ------------------------------------------------------------------------------------------------
    def first_non_finite(self) -> NonFiniteEvent | None:
        """The first module whose output, or whose true-scale gradient, was NaN/inf; None while all is finite."""
        return self.event

    def rows(self) -> list[dict]:
        """One plain dict per (step, module), in the order the modules ran, for CSV/JSONL output."""
        return [{"step": step, "module": name, **record}
                for step, modules in sorted(self.records.items()) for name, record in modules.items()]

    def grad_norm_matrix(self, key: str = "grad_norm") -> tuple[list[str], list[int], list[list[float | None]]]:
        """(modules, steps, values[module][step]) of `key` for a heatmap; None where a module had no value."""
        steps = sorted(self.records)
        modules = list(dict.fromkeys(name for s in steps for name, r in self.records[s].items() if key in r))
        values = [[self.records[s].get(name, {}).get(key) for s in steps] for name in modules]
        return modules, steps, values


def hook_count(model: nn.Module) -> int:
    """Forward and backward hooks registered on the modules of `model` (0: a monitor left nothing behind)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(module, kind, {})) for module in model.modules() for kind in kinds)
