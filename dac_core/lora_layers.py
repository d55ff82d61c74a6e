"""LoRA layers that take the cheaper of two mathematically equal paths, layer by layer.

A LoRA adds s * (alpha / rank) * up @ down to a layer's weight W. It can be applied

- on the activations (what peft does): y = W x + s * (alpha / rank) * up (down x), which
  costs about tokens * rank * (in + out) per call, and in training stores down x; or
- through the weights: y = (W + s * (alpha / rank) * up @ down) x, which costs
  rank * in * out to form the weight (in training also the weight's gradient,
  tokens * in * out), and nothing if the LoRA is frozen and its up @ down is cached.

`LoRAHost` wraps one Linear or Conv2d with any number of named LoRAs. With path "auto" it
picks, at every call, the path whose cost is lower for this layer, this input size and
whether the LoRA trains: at 64-128 px a rank-512 UNet LoRA is cheaper through the weights
(the layers have few channels and many tokens), at SD size the deep 1280-channel layers
with few tokens are cheaper on the activations. A frozen LoRA (U in Abduction-2 and in
sampling) caches up @ down once; each call then costs one add, W + gamma * dU.

Both paths are the same function with the same parameters and gradients; they differ by
float rounding only. The activation path computes exactly what peft computes, op for op.
A strength may be a float, a 0-dim tensor, or a tensor with one entry per sample of the
batch (gamma(t) at per-sample timesteps); per-sample strengths that differ use the
activation path. LoRA weights are float32 whatever the layer's dtype.

The cost model (`weight_path_cheaper`) and the activation path (`on_activations`) are module
functions: the ComfyUI backend (nodes/comfy_backend.py) makes the same choice per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import LoRALayer

PATHS = ("auto", "weight", "activation")
# What adding a cached up @ down to W costs per element, in multiply-adds of the activation
# path. A memory-bound add of 14.7 M floats into a reused buffer took as long as about 40
# multiply-adds per element of a large matmul (2-core Xeon, float32), but the activation
# path over few positions runs far below a large matmul's rate: with 40 the tiny and mid
# UNets sent their low-resolution layers to the activation path and Abduction-2 took 1.5x as
# long as with every frozen layer through the weights; 10 takes the faster path on every
# model measured (benchmarks/speed.py, docs/speed.md).
ELEMENTWISE_COST = 10

# A frozen merged weight of at least this many elements is formed in a reused buffer (and
# formed again for the backward pass rather than kept); a smaller one is cheaper to allocate
# and keep than to handle so (the per-call overhead dominated the tiny and mid UNets).
LARGE_WEIGHT = 2**20

_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


# --- the cost model and the activation path, shared with the ComfyUI backend ----------------
def positions(layer: torch.nn.Linear | torch.nn.Conv2d, x: torch.Tensor) -> int:
    """Positions `layer` is applied at for input `x` (output positions for a convolution)."""
    if isinstance(layer, torch.nn.Linear):
        return x.numel() // x.shape[-1]
    h, w = x.shape[-2:]
    sh, sw = layer.stride
    return x.shape[0] * max(h // sh, 1) * max(w // sw, 1)


def weight_path_cheaper(layer: torch.nn.Linear | torch.nn.Conv2d, x: torch.Tensor, rank: int, trains: bool) -> bool:
    """Whether a rank-`rank` LoRA on `layer` costs fewer multiply-adds through the weights than
    on the activations for input `x`; `trains`: its factors get gradients (when gradients are
    enabled). A frozen LoRA is counted with its up @ down cached (one add to W a call)."""
    out_f, fan_in = layer.weight.shape[0], layer.weight[0].numel()
    tokens = positions(layer, x)
    activation = tokens * rank * (fan_in + out_f)
    if trains and torch.is_grad_enabled():
        # forward + two backward products on each side; the weight path also computes
        # the merged weight's gradient (tokens * in * out) and its factors' (2 * rank * in * out)
        return tokens * out_f * fan_in + 3 * rank * out_f * fan_in <= 3 * activation
    # frozen: up @ down is formed once and cached (not counted); each call adds it to W (a
    # memory-bound pass, ELEMENTWISE_COST multiply-adds an element), again in the backward
    # pass when gradients flow through, as the activation path computes its part again
    return ELEMENTWISE_COST * out_f * fan_in <= activation


def on_activations(layer: torch.nn.Linear | torch.nn.Conv2d, x: torch.Tensor, down: torch.Tensor,
                   up: torch.Tensor) -> torch.Tensor:
    """up(down(x)) for a LoRA on `layer`, unscaled, as peft computes it (x in the LoRA's dtype;
    for a convolution, down with the layer's kernel, stride and padding, up 1 x 1)."""
    xa = x.to(down.dtype)
    if isinstance(layer, torch.nn.Linear):
        return F.linear(F.linear(xa, down), up)
    return F.conv2d(F.conv2d(xa, down, None, layer.stride, layer.padding), up)


def _scratch_like(w: torch.Tensor) -> torch.Tensor:
    """A reused buffer shaped like `w`, for a merged weight that lives only inside one layer's
    call: allocating hundreds of MB afresh each call costs more than the add itself on a CPU."""
    key = (w.device, w.dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < w.numel():
        buf = _scratch[key] = torch.empty(w.numel(), device=w.device, dtype=w.dtype)
    return buf[: w.numel()].view(w.shape)


class _FrozenMerged(torch.autograd.Function):
    """y = layer(x) with the weight W + sum s * dU of frozen LoRAs (dU cached), differentiable
    in x only; the merged weight is formed in a reused buffer and formed again for the
    backward pass instead of being kept (it is as large as the layer's weight)."""

    @staticmethod
    def forward(ctx, x, host, merged):
        ctx.host, ctx.merged, ctx.x_shape = host, merged, x.shape
        return host._apply(x, host._merged_weight(merged, scratch=True))

    @staticmethod
    def backward(ctx, grad):
        base, w = ctx.host.base_layer, ctx.host._merged_weight(ctx.merged, scratch=True)
        if isinstance(base, torch.nn.Linear):
            dx = grad @ w
        else:
            dx = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad, base.stride, base.padding, base.dilation,
                                            base.groups)
        return dx, None, None


class LoRAHost(torch.nn.Module):
    """A Linear or Conv2d (`base_layer`, unchanged) plus named LoRAs, each with a strength."""

    def __init__(self, base_layer: torch.nn.Linear | torch.nn.Conv2d, path: str = "auto"):
        super().__init__()
        if not isinstance(base_layer, (torch.nn.Linear, torch.nn.Conv2d)):
            raise TypeError(f"a LoRA layer wraps a Linear or Conv2d, not {type(base_layer).__name__}")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.base_layer = base_layer
        self.lora_down = torch.nn.ParameterDict()
        self.lora_up = torch.nn.ParameterDict()
        self.alpha: dict[str, float] = {}
        self.strength: dict[str, float | torch.Tensor] = {}
        self.path = path
        self._cached: dict[str, torch.Tensor] = {}  # name -> (alpha / rank) * up @ down of a frozen LoRA
        self.last_paths: dict[str, str] = {}  # name -> the path the last call took (for tests and benchmarks)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # --- the LoRAs ----------------------------------------------------------------------
    def add(self, name: str, layer: LoRALayer, trainable: bool) -> list[torch.nn.Parameter]:
        """Attach LoRA `name` (float32 copies of `layer`'s factors) at strength 1."""
        device = self.base_layer.weight.device
        down = torch.nn.Parameter(layer.down.to(device, torch.float32, copy=True), requires_grad=trainable)
        up = torch.nn.Parameter(layer.up.to(device, torch.float32, copy=True), requires_grad=trainable)
        self.lora_down[name], self.lora_up[name] = down, up
        self.alpha[name] = float(layer.alpha)
        self.strength[name] = 1.0
        self._cached.pop(name, None)
        return [down, up] if trainable else []

    def remove(self, name: str) -> None:
        for table in (self.lora_down, self.lora_up):
            if name in table:
                del table[name]
        for table in (self.alpha, self.strength, self._cached, self.last_paths):
            table.pop(name, None)

    def names(self) -> list[str]:
        return list(self.lora_down.keys())

    def export(self, name: str) -> LoRALayer:
        return LoRALayer(self.lora_down[name].detach().float().cpu().clone(),
                         self.lora_up[name].detach().float().cpu().clone(), self.alpha[name])

    def set_strength(self, name: str, strength: float | torch.Tensor) -> None:
        self.strength[name] = strength

    def _trains(self, name: str) -> bool:
        return self.lora_down[name].requires_grad or self.lora_up[name].requires_grad

    def _delta(self, name: str) -> torch.Tensor:
        """(alpha / rank) * up @ down, float32, shaped like the weight; cached while frozen."""
        if name in self._cached:
            return self._cached[name]
        down, up = self.lora_down[name], self.lora_up[name]
        d = (up.flatten(1) @ down.flatten(1)).view(self.base_layer.weight.shape) * (self.alpha[name] / down.shape[0])
        if not self._trains(name):
            self._cached[name] = d.detach()
        return d

    # --- the cost model ---------------------------------------------------------------------
    def _tokens(self, x: torch.Tensor) -> int:
        return positions(self.base_layer, x)

    def through_weights(self, name: str, x: torch.Tensor) -> bool:
        """Whether LoRA `name` is cheaper through the weights for input `x` (multiply-adds)."""
        if self.path != "auto":
            return self.path == "weight"
        return weight_path_cheaper(self.base_layer, x, self.lora_down[name].shape[0], self._trains(name))

    def _merged_weight(self, merged: list[tuple[str, float | torch.Tensor]], scratch: bool = False) -> torch.Tensor:
        """W + sum of s * (alpha / rank) * up @ down, formed in float32, in W's dtype; with
        `scratch` (frozen LoRAs, float strengths, float32 W) in a reused buffer."""
        w = self.base_layer.weight
        if scratch and w.dtype == torch.float32:
            out = _scratch_like(w)
            (name, s), rest = merged[0], merged[1:]
            torch.add(w, self._delta(name), alpha=s, out=out)
            for name, s in rest:
                out.add_(self._delta(name), alpha=s)
            return out
        flat = w.flatten(1).float()
        for name, s in merged:
            if not self._trains(name):  # frozen: its up @ down is cached
                d = self._delta(name).flatten(1)
                flat = torch.add(flat, d, alpha=s) if isinstance(s, (int, float)) else flat + d * s
                continue
            down, up = self.lora_down[name], self.lora_up[name]
            c = self.alpha[name] / down.shape[0] * s
            if isinstance(c, torch.Tensor):
                flat = flat + (up.flatten(1) @ down.flatten(1)) * c
            else:  # one kernel: flat + c * up @ down
                flat = torch.addmm(flat, up.flatten(1), down.flatten(1), alpha=c)
        return flat.view(w.shape).to(w.dtype)

    # --- forward ------------------------------------------------------------------------
    def _apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.linear(x, w, base.bias) if isinstance(base, torch.nn.Linear) else base._conv_forward(x, w, base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        merged: list[tuple[str, float | torch.Tensor]] = []
        separate: list[tuple[str, float | torch.Tensor]] = []
        for name in self.lora_down.keys():
            s = self.strength[name]
            if isinstance(s, (int, float)) and s == 0:
                continue
            if isinstance(s, torch.Tensor) and s.numel() == 1:
                s = s.reshape(())
            per_sample = isinstance(s, torch.Tensor) and s.dim() > 0
            weight_path = not per_sample and self.through_weights(name, x)
            (merged if weight_path else separate).append((name, s))
            self.last_paths[name] = "weight" if weight_path else "activation"
        if merged:
            frozen = all(not self._trains(name) and isinstance(s, (int, float)) for name, s in merged)
            large = base.weight.numel() >= LARGE_WEIGHT
            if frozen and large and not base.weight.requires_grad:
                if torch.is_grad_enabled() and x.requires_grad:
                    result = _FrozenMerged.apply(x, self, merged)
                elif torch.is_grad_enabled():
                    result = self._apply(x, self._merged_weight(merged).detach())
                else:
                    result = self._apply(x, self._merged_weight(merged, scratch=True))
            else:
                result = self._apply(x, self._merged_weight(merged))
        else:
            result = base(x)
        out_dtype = result.dtype
        for name, s in separate:
            down = self.lora_down[name]
            h = on_activations(base, x, down, self.lora_up[name])
            scaling = self.alpha[name] / down.shape[0]
            if isinstance(s, torch.Tensor) and s.dim() > 0:
                if s.shape[0] != x.shape[0]:
                    raise ValueError(f"LoRA {name!r} strength has {s.shape[0]} entries for a batch of {x.shape[0]}")
                scaling = scaling * s.to(x.device).view(-1, *([1] * (x.dim() - 1)))
            else:
                scaling = scaling * s
            result = result + h * scaling
        return result.to(out_dtype)


def hosts(model: torch.nn.Module) -> list[tuple[str, LoRAHost]]:
    """(module name, host) of every LoRA layer in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAHost)]
