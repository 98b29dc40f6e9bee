"""Full policy weights into rollout engines: the bf16 transformers copy and the vLLM push.

The sharded paths (FSDP2, ZeRO-3) run end to end in tests/test_distributed.py; vLLM needs a
GPU, so here its engine is a stand-in that records what the trainer sends it.
"""

from __future__ import annotations

import pytest
import torch

from autotraj.train.policy_weights import HfRolloutCopy, VllmRolloutEngine, full_parameters


class Unsharded:
    """An accelerator with nothing distributed (what full_parameters needs of one)."""

    class distributed_type:  # noqa: N801 - mimics accelerate's enum member
        value = "NO"

    @staticmethod
    def unwrap_model(model):
        return model


@pytest.fixture
def policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_copy_receives_every_parameter(policy, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    copy = HfRolloutCopy(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5)
    count = copy.sync(full_parameters(Unsharded, policy))
    assert count == len(list(policy.named_parameters()))
    for name, p in policy.named_parameters():
        got = copy.model.get_parameter(name)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, p.to(torch.bfloat16))


def test_copy_refuses_partial_or_foreign_weights(policy, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    copy = HfRolloutCopy(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    params = list(full_parameters(Unsharded, policy))
    with pytest.raises(RuntimeError, match="no weights for"):
        copy.sync(params[1:])
    with pytest.raises(RuntimeError, match="no parameter 'model.extra.weight'"):
        copy.sync([*params, ("model.extra.weight", torch.zeros(1))])
    name, tensor = params[0]
    with pytest.raises(RuntimeError, match=f"parameter {name}: policy shape"):
        copy.sync([(name, tensor[:1]), *params[1:]])


class FakeLLM:
    """Records the calls a VllmRolloutEngine makes on vllm.LLM."""

    def __init__(self):
        self.calls = []
        self.loaded = {}

    def collective_rpc(self, method, args=()):
        (chunk,) = args
        self.calls.append((method, len(chunk)))
        self.loaded.update(chunk)

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", 0))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self):
        self.calls.append(("wake_up", 0))


def test_vllm_push_sends_all_weights_in_chunks_then_drops_the_prefix_cache(policy, monkeypatch):
    monkeypatch.setattr(VllmRolloutEngine, "CHUNK", 3)
    llm = FakeLLM()
    engine = VllmRolloutEngine(llm, sleep=True)
    params = dict(policy.named_parameters())
    assert engine.sync(full_parameters(Unsharded, policy)) == len(params)
    pushes = [n for method, n in llm.calls if method == "load_policy_weights"]
    assert sum(pushes) == len(params) and max(pushes) == 3
    assert llm.calls[-1] == ("reset_prefix_cache", 0)
    for name, p in params.items():
        torch.testing.assert_close(llm.loaded[name], p.detach())
        assert llm.loaded[name].data_ptr() != p.data_ptr()  # a copy: gathered storage is freed
    engine.release()
    llm.calls.clear()
    engine.sync(full_parameters(Unsharded, policy))
    assert llm.calls[0] == ("wake_up", 0)  # the engine slept through the update
