"""The packed multi-LoRA layer against separate PEFT adapters: outputs, gradients, export."""
from __future__ import annotations

import json

import pytest
import torch

from genpi.train.multilora import PackedLora, target_names

R, ALPHA, K = 4, 8.0, 3


def _peft_model(base, n):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg, adapter_name="a0")
    for k in range(1, n):
        model.add_adapter(f"a{k}", cfg)
    # Random B as well as A: with PEFT's zero B every gradient of A would be 0 and prove nothing.
    torch.manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def _copy_peft_into_pack(peft_model, pack):
    with torch.no_grad():
        for name, m in pack.modules.items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            for k in range(pack.n_adapters):
                m.lora_A[k].copy_(peft_layer.lora_A[f"a{k}"].weight)
                m.lora_B[k].copy_(peft_layer.lora_B[f"a{k}"].weight)


@pytest.fixture
def pair(tiny_llama, single_thread_torch):
    """(PEFT model with K adapters, packed model with the same K adapters, inputs)."""
    peft_model = _peft_model(tiny_llama(seed=0), K)
    packed_base = tiny_llama(seed=0)
    pack = PackedLora(packed_base, K, R, ALPHA)
    _copy_peft_into_pack(peft_model, pack)
    torch.manual_seed(7)
    ids = torch.randint(0, 128, (6, 9))
    mask = torch.ones_like(ids)
    mask[4, 6:] = 0  # one right-padded sample
    return peft_model, pack, ids, mask


def test_targets_match_peft_all_linear(tiny_llama):
    from peft import LoraConfig, get_peft_model

    names = target_names(tiny_llama(), "all-linear")
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=R, target_modules="all-linear", task_type="CAUSAL_LM"))
    peft_names = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
                  for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")}
    assert set(names) == peft_names and "lm_head" not in names and len(names) == 14


def test_outputs_and_gradients_match_separate_peft_adapters(pair):
    peft_model, pack, ids, mask = pair
    index = torch.tensor([0, 1, 2, 1, 0, -1])
    weights = torch.randn(6, 9, 128)  # a loss that touches every logit differently

    with pack.route_to(index):
        packed_logits = pack.model(input_ids=ids, attention_mask=mask).logits
    (packed_logits * weights).sum().backward()

    for k in range(K):
        rows = (index == k).nonzero().flatten()
        peft_model.set_adapter(f"a{k}")
        peft_model.zero_grad()
        ref = peft_model(input_ids=ids[rows], attention_mask=mask[rows]).logits
        torch.testing.assert_close(packed_logits[rows], ref, rtol=1e-5, atol=1e-5)
        (ref * weights[rows]).sum().backward()
        for name, m in pack.modules.items():
            layer = peft_model.base_model.model.get_submodule(name)
            for w in ("lora_A", "lora_B"):
                want = getattr(layer, w)[f"a{k}"].weight.grad
                assert want is not None and want.abs().sum() > 0
                torch.testing.assert_close(getattr(m, w).grad[k], want, rtol=1e-4, atol=1e-5)
    with peft_model.disable_adapter():
        base = peft_model(input_ids=ids[5:], attention_mask=mask[5:]).logits
    torch.testing.assert_close(packed_logits[5:], base, rtol=1e-5, atol=1e-5)


def test_no_route_is_the_base_and_remove_restores(tiny_llama):
    ref = tiny_llama(seed=0)
    model = tiny_llama(seed=0)
    pack = PackedLora(model, 2, R, ALPHA, seeds=[1, 2])
    with torch.no_grad():
        for p in pack.parameters():
            p.normal_()
    ids = torch.randint(0, 128, (2, 5))
    want = ref(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, want)  # no route set: base
    with pack.route_to([0, 1]):
        assert not torch.allclose(model(input_ids=ids).logits, want)
    pack.remove()
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(input_ids=ids).logits, want)


def test_init_depends_on_the_seed_not_the_slot(tiny_llama):
    a = PackedLora(tiny_llama(), 3, R, ALPHA, seeds=[5, 6, 7])
    b = PackedLora(tiny_llama(), 1, R, ALPHA, seeds=[6])
    for name in a.modules:
        torch.testing.assert_close(a.modules[name].lora_A[1], b.modules[name].lora_A[0])
        assert a.modules[name].lora_B.abs().sum() == 0  # PEFT's init: B = 0, adapter starts as the base
    assert not torch.equal(next(iter(a.modules.values())).lora_A[0], next(iter(a.modules.values())).lora_A[1])


def test_exported_adapter_loads_in_plain_peft_and_matches(pair, tiny_llama, tmp_path):
    from peft import PeftModel

    _, pack, ids, mask = pair
    pack.export_peft(1, str(tmp_path / "ad1"), base_model_name="tiny")
    cfg = json.loads((tmp_path / "ad1" / "adapter_config.json").read_text())
    assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA and cfg["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "ad1"))
    with torch.no_grad():
        with pack.route_to([1] * ids.shape[0]):
            want = pack.model(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with loaded.disable_adapter():
            assert (loaded(input_ids=ids).logits - got).abs().max() > 1e-3  # the adapter does something
    # And back: a PEFT folder loads into a slot of a pack.
    other = PackedLora(tiny_llama(seed=0), 2, R, ALPHA)
    other.load_peft(0, str(tmp_path / "ad1"))
    for name, m in other.modules.items():
        torch.testing.assert_close(m.lora_A[0], pack.modules[name].lora_A[1])


def test_a_batch_on_one_adapter_takes_two_matmuls_and_gives_the_gathered_result(tiny_llama):
    """Every row on the same adapter runs plain matmuls (route.single) instead of per-row
    gathers and bmm: same outputs and same gradients as those rows in a mixed batch."""
    model = tiny_llama(seed=0)
    pack = PackedLora(model, 3, 4, 8, seeds=[1, 2, 3])
    with torch.no_grad():
        for p in pack.parameters():
            p.normal_(std=0.2)
    ids = torch.randint(1, 128, (3, 7))

    def run(route):
        for p in pack.parameters():
            p.grad = None
        with pack.route_to(route):
            assert (pack.route.single is not None) == (len(set(route)) == 1)
            out = model(input_ids=ids).logits
        out[:2].pow(2).sum().backward()  # rows 0 and 1 only: adapter 2's rows in both batches
        return out[:2].detach(), [p.grad[2].clone() for p in pack.parameters()]

    single, g_single = run([2, 2, 2])
    mixed, g_mixed = run([2, 2, 0])
    torch.testing.assert_close(single, mixed, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_single, g_mixed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    pack.remove()
