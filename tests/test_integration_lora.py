"""LoRA (peft) on QuantLinear bases (qkernels/integrations/peft_lora.py): training moves only the adapters, gradients
equal those through the dequantized nn.Linear, merge re-quantizes, unmerge restores.

The gradients that reach earlier layers flow through QuantLinear's ops (their backward w.r.t. x,
qkernels/ops/autograd.py)."""

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from qkernels import Int4WeightOnly, Int8WeightOnly, QuantLinear, quantize_  # noqa: E402
from qkernels.integrations.peft_lora import QuantLinearLora, get_peft_model, linear_target_names  # noqa: E402

from .conftest import rel_err  # noqa: E402
from .test_integration_transformers import SCHEMES, tiny  # noqa: E402

IDS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))


def lora_model(scheme, r=8, init=True, seed=0):
    model = tiny(seed=seed)
    quantize_(model, scheme)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0,
                          init_lora_weights=init)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, cfg)


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinearLora)}


def frozen_buffers(model):
    return {n: {k: v.clone() for k, v in m.get_base_layer().state_dict().items()}
            for n, m in lora_layers(model).items()}


def as_dequantized_linears(model, dtype=torch.float32):
    """A copy whose LoRA layers wrap nn.Linear(dequantize()) (in ``dtype``) instead of the QuantLinear."""
    ref = copy.deepcopy(model)
    for m in lora_layers(ref).values():
        q = m.get_base_layer()
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(torch.float32))
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        lin.requires_grad_(False)
        m.base_layer = lin.to(dtype)
    return ref


def lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_lora_layers_replace_every_quantlinear():
    model = lora_model(Int4WeightOnly(group_size=32))
    assert len(lora_layers(model)) == 14
    assert linear_target_names(tiny()) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                           "v_proj"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # the quantized base holds no parameters at all: nothing of it can reach an optimizer
    assert all(not list(m.get_base_layer().parameters()) for m in lora_layers(model).values())


def test_25_steps_lower_the_loss_codes_bit_identical():
    model = lora_model(Int4WeightOnly(group_size=32))
    before = frozen_buffers(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(25):
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        if step == 1:  # lora_B starts at zero: from the second step every adapter, first layer included, has a grad
            grads = lora_grads(model)
            first = [n for n in grads if ".layers.0." in n]
            assert first and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads), \
                [n for n in grads if grads[n] is None or grads[n].abs().sum() == 0][:4]
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    after = frozen_buffers(model)
    for name, bufs in before.items():
        for k, v in bufs.items():
            assert torch.equal(after[name][k], v), (name, k)


def test_model_gradients_equal_dequantized_linear():
    model = lora_model(Int4WeightOnly(group_size=32), init=False)  # random B: every adapter gets a grad at once
    ref = as_dequantized_linears(model)
    model(input_ids=IDS, labels=IDS).loss.backward()
    ref(input_ids=IDS, labels=IDS).loss.backward()
    got, want = lora_grads(model), lora_grads(ref)
    assert set(got) == set(want) and len(got) == 28
    for n in got:
        assert got[n] is not None and rel_err(got[n], want[n]) < 1e-3, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_layer_gradients_equal_dequantized_linear(scheme, dtype):
    # schemes that round the activations (W8A8, W4A8, fp8 dynamic, W4A4) take the straight-through gradient
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 48), scheme)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    seq = nn.Sequential(q)
    seq.register_parameter("unused", nn.Parameter(torch.zeros(1)))  # peft reads the device off a parameter
    model = get_peft_model(seq, cfg)
    ref = as_dequantized_linears(model, dtype)
    x = torch.randn(2, 5, 64, dtype=dtype)
    g = torch.randn(2, 5, 48, dtype=dtype)  # a linear loss: the grads do not depend on the activation rounding
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    for m, xi in zip((model, ref), xs):
        (m(xi).to(dtype) * g).sum().backward()
    assert xs[0].grad is not None, f"no gradient reached x through QuantLinear({scheme!r})"
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    assert rel_err(xs[0].grad, xs[1].grad) < tol
    got, want = lora_grads(model), lora_grads(ref)
    for n in got:
        assert rel_err(got[n], want[n]) < tol, n


def test_merge_requantizes_and_unmerge_restores():
    scheme = Int8WeightOnly()
    model = lora_model(scheme, init=False)  # random A and B: adapters that change the logits a lot
    before = frozen_buffers(model)
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        with model.disable_adapter():
            base_only = model(input_ids=IDS).logits
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    base = layer.get_base_layer()
    want_w = base.dequantize(torch.float32) + layer.get_delta_weight("default")
    layer.merge()
    merged_q = layer.get_base_layer()
    assert isinstance(merged_q, QuantLinear) and merged_q is not base and merged_q.scheme == scheme
    lin = nn.Linear(base.in_features, base.out_features, bias=False)
    with torch.no_grad():
        lin.weight.copy_(want_w)
    expect = QuantLinear.from_linear(lin, scheme)  # round to nearest of the merged float weight
    assert torch.equal(merged_q.qweight, expect.qweight) and torch.equal(merged_q.scale, expect.scale)
    layer.unmerge()
    assert layer.get_base_layer() is base
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, unmerged)
    assert frozen_buffers(model).keys() == before.keys()

    merged = model.merge_and_unload()
    assert not lora_layers(merged)
    assert sum(isinstance(m, QuantLinear) for m in merged.modules()) == 14
    with torch.no_grad():
        out = merged(input_ids=IDS).logits
    # one more int8 rounding than base + adapter: the adapters' effect is kept up to that rounding
    effect = rel_err(base_only, unmerged)
    assert effect > 0.5 and 0 < rel_err(out, unmerged) < 0.05 * effect


def test_unsupported_variants_are_refused():
    model = tiny()
    quantize_(model, Int4WeightOnly(group_size=32))
    with pytest.raises(ValueError, match="use_dora=True is not supported on qkernels QuantLinear"):
        get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(TypeError, match="config must be a peft.LoraConfig"):
        get_peft_model(model, {"r": 4})


def test_float_layers_keep_peft_default():
    # a model that is only partly quantized: nn.Linear targets get peft's own LoRA layer
    model = tiny()
    quantize_(model, Int8WeightOnly(), filter_fn=lambda m, n: isinstance(m, nn.Linear) and ".layers.0." in n)
    pm = get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    kinds = {type(m).__name__ for n, m in pm.named_modules() if n.endswith("q_proj")}
    assert kinds == {"QuantLinearLora", "Linear"}


def test_lora_on_from_pretrained_model(tmp_path):
    # the README path: from_pretrained(qkernels dir) -> LoRA -> a step -> save the adapter
    from qkernels import save_quantized

    model = tiny()
    quantize_(model, Int4WeightOnly(group_size=32))
    save_quantized(model, tmp_path / "q")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    pm = get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert len(lora_layers(pm)) == 14
    before = frozen_buffers(pm)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    loss0 = pm(input_ids=IDS, labels=IDS).loss
    loss0.backward()
    opt.step()
    with torch.no_grad():
        assert pm(input_ids=IDS, labels=IDS).loss < loss0
    assert all(torch.equal(v, frozen_buffers(pm)[n][k]) for n, b in before.items() for k, v in b.items())
    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
