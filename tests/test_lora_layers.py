"""LoRAHost: a LoRA through the weights and on the activations is the same function with
the same gradients (to float32 rounding), the activation path is peft's to the bit, and the
cost model takes each layer the cheaper way."""

import pytest
import torch

from dac_core.lora import LoRALayer, fresh_lora
from dac_core.lora_layers import LoRAHost

# float32 rounding of the two orders of summation, relative to the largest value compared
TOLERANCE = 1e-5


def layer(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return torch.nn.Linear(24, 40)
    return torch.nn.Conv2d(16, 24, 3, stride=2, padding=1)


def trained_lora(base: torch.nn.Module, rank: int = 6, seed: int = 1) -> LoRALayer:
    """A LoRA whose up is not zero (a fresh one would add nothing)."""
    g = torch.Generator().manual_seed(seed)
    lora = fresh_lora({"x": base.weight.shape}, rank, g).layers["x"]
    return LoRALayer(lora.down, torch.randn(lora.up.shape, generator=g) * 0.1, lora.alpha)


def inputs(kind: str, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    shape = (batch, 7, 24) if kind == "linear" else (batch, 16, 10, 12)
    return torch.randn(shape, generator=g, requires_grad=True)


def run(kind: str, path: str, strength, trainable: bool = True):
    host = LoRAHost(layer(kind), path)
    params = host.add("u", trained_lora(host.base_layer), trainable)
    host.set_strength("u", strength)
    x = inputs(kind)
    y = host(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = [x.grad] + [p.grad for p in params]
    return host, y.detach(), grads


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= TOLERANCE * b.abs().max())


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("strength", [1.0, -0.7, torch.tensor(0.85)])
def test_both_paths_are_the_same_function_and_gradients(kind, strength):
    w_host, y_w, g_w = run(kind, "weight", strength)
    a_host, y_a, g_a = run(kind, "activation", strength)
    assert w_host.last_paths == {"u": "weight"} and a_host.last_paths == {"u": "activation"}
    assert not torch.equal(y_w, y_a)  # really two computations
    assert close(y_w, y_a)
    for gw, ga in zip(g_w, g_a):  # the input's, down's and up's gradients
        assert gw is not None and close(gw, ga)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("large", [0, 2**20])
def test_a_frozen_lora_through_the_weights_passes_the_same_input_gradient(kind, large, monkeypatch):
    """U frozen (Abduction-2): a large merged weight is formed in a reused buffer and formed
    again for the backward pass, a small one kept; either way the input's gradient is the
    activation path's."""
    from dac_core import lora_layers

    monkeypatch.setattr(lora_layers, "LARGE_WEIGHT", large)
    w_host, y_w, g_w = run(kind, "weight", 0.8, trainable=False)
    _, y_a, g_a = run(kind, "activation", 0.8, trainable=False)
    assert w_host.last_paths == {"u": "weight"} and w_host._cached
    assert close(y_w, y_a) and close(g_w[0], g_a[0])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_activation_path_is_peft_to_the_bit(kind):
    from peft import LoraConfig, inject_adapter_in_model

    base = layer(kind)
    lora = trained_lora(base)
    holder = torch.nn.Sequential(layer(kind))
    inject_adapter_in_model(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=["0"]), holder,
                            adapter_name="u")
    peft_layer = holder[0]
    peft_layer.lora_A["u"].weight.data.copy_(lora.down)
    peft_layer.lora_B["u"].weight.data.copy_(lora.up)
    peft_layer.scaling["u"] = -0.7 * lora.alpha / lora.rank
    host = LoRAHost(base, "activation")
    host.add("u", lora, trainable=False)
    host.set_strength("u", -0.7)
    x = inputs(kind)
    with torch.no_grad():
        assert torch.equal(host(x), peft_layer(x))


def test_per_sample_strengths_take_the_activation_path_and_act_per_sample():
    strengths = torch.tensor([0.2, 1.0, 0.55])
    host, y, _ = run("conv", "weight", strengths)
    assert host.last_paths == {"u": "activation"}  # one merged weight cannot hold three strengths
    for i, s in enumerate(strengths):
        _, alone, _ = run("conv", "weight", float(s))
        assert close(y[i], alone[i])
    with pytest.raises(ValueError, match="strength has 2 entries for a batch of 3"):
        host.set_strength("u", torch.tensor([0.2, 1.0]))
        host(inputs("conv"))


def test_a_frozen_lora_is_multiplied_out_once():
    host = LoRAHost(layer("conv"), "weight")
    lora = trained_lora(host.base_layer)
    host.add("u", lora, trainable=False)
    x = inputs("conv").detach()
    with torch.no_grad():
        first = host(x)
        cached = host._cached["u"]
        host.set_strength("u", 0.5)
        host(x)
        assert host._cached["u"] is cached  # not formed again for a new strength
        assert torch.allclose(cached, lora.delta(), rtol=0, atol=1e-7)
        host.add("u", LoRALayer(lora.down, 2 * lora.up, lora.alpha), trainable=False)
        assert "u" not in host._cached  # a new LoRA under the same name is not served stale
        host.set_strength("u", 0.5)
        assert close(host(x), first)  # 0.5 * (2 up) = 1 * up


def test_zero_strength_and_removal_leave_the_base_layer():
    host = LoRAHost(layer("linear"))
    host.add("u", trained_lora(host.base_layer), trainable=False)
    x = inputs("linear").detach()
    with torch.no_grad():
        plain = host.base_layer(x)
        host.set_strength("u", 0.0)
        assert torch.equal(host(x), plain)
        host.set_strength("u", 1.0)
        assert not torch.equal(host(x), plain)
        host.remove("u")
        assert host.names() == [] and torch.equal(host(x), plain)


def test_the_cost_model_takes_each_layer_the_cheaper_way():
    """A rank-512 LoRA on a 32-channel convolution over 64x64 positions is cheaper through
    the weights; on a 1280-channel one over 8x8 positions, on the activations. Frozen (as U
    in Abduction-2 and in sampling), the weight path costs one add of the cached up @ down:
    cheaper on the 1280-channel layer over 8x8 positions too, not on one position."""
    small = LoRAHost(torch.nn.Conv2d(32, 32, 3, padding=1))
    deep = LoRAHost(torch.nn.Conv2d(1280, 1280, 3, padding=1))
    for host in (small, deep):
        shape = host.weight.shape
        down = torch.zeros(512, *shape[1:])
        host.add("u", LoRALayer(down, torch.zeros(shape[0], 512, 1, 1), 512.0), trainable=True)
    assert small.through_weights("u", torch.zeros(1, 32, 64, 64))
    assert not deep.through_weights("u", torch.zeros(1, 1280, 8, 8))
    for host in (small, deep):
        host.lora_down["u"].requires_grad_(False)
        host.lora_up["u"].requires_grad_(False)
    assert deep.through_weights("u", torch.zeros(1, 1280, 8, 8))
    assert not deep.through_weights("u", torch.zeros(1, 1280, 1, 1))
    # the text encoder's rank-4 LoRA over 77 tokens stays on the activations while it trains
    text = LoRAHost(torch.nn.Linear(768, 768))
    text.add("delta", LoRALayer(torch.zeros(4, 768), torch.zeros(768, 4), 4.0), trainable=True)
    assert not text.through_weights("delta", torch.zeros(1, 77, 768))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_keep_float32_loras(dtype):
    base = layer("linear").to(dtype)
    outputs = {}
    for path in ("weight", "activation"):
        host = LoRAHost(base, path)
        params = host.add("u", trained_lora(base), trainable=True)
        assert all(p.dtype == torch.float32 for p in params)
        x = inputs("linear").detach().to(dtype)
        y = host(x)
        assert y.dtype == dtype
        y.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        outputs[path] = y.float().detach()
    # each path rounds to the layer's dtype once: the two agree to that dtype's precision
    eps = torch.finfo(dtype).eps
    assert (outputs["weight"] - outputs["activation"]).abs().max() <= 8 * eps * outputs["activation"].abs().max()


def test_a_host_wraps_only_linear_and_conv_layers():
    with pytest.raises(TypeError, match="wraps a Linear or Conv2d, not GroupNorm"):
        LoRAHost(torch.nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="path must be one of"):
        LoRAHost(torch.nn.Linear(2, 2), "fast")
