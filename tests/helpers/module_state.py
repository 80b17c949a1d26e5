"""What a user sees of a module, for checking that a failed fit left it as it was."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

import sharded_cases as cases


def module_state(module: pl.LightningModule) -> dict[str, Any]:
    batch = cases.loader().dataset[0]["input_ids"][None]
    was_training = module.training
    module.eval()
    with torch.no_grad():
        logits = module.net(input_ids=batch).logits
    module.train(was_training)
    return {
        "parameters": {n: (p.detach().clone(), p.requires_grad, p.dtype) for n, p in module.named_parameters()},
        "buffers": {n: b.clone() for n, b in module.named_buffers()},
        "keys": list(module.state_dict()),
        "classes": [(n, type(m).__name__) for n, m in module.named_modules()],
        "instance_forwards": [n for n, m in module.named_modules() if "forward" in vars(m)],
        "attention": module.net.config._attn_implementation,
        "logits": logits,
    }


def assert_same_state(after: dict[str, Any], before: dict[str, Any]) -> None:
    assert after["keys"] == before["keys"] and after["classes"] == before["classes"]
    assert after["instance_forwards"] == before["instance_forwards"] == []
    assert after["attention"] == before["attention"]
    assert after["parameters"].keys() == before["parameters"].keys() and before["parameters"]
    for name, (value, flag, dtype) in before["parameters"].items():
        now = after["parameters"][name]
        assert now[1] == flag and now[2] == dtype and torch.equal(now[0], value), name
    assert after["buffers"].keys() == before["buffers"].keys()
    assert all(torch.equal(after["buffers"][n], b) for n, b in before["buffers"].items())
    assert torch.equal(after["logits"], before["logits"])
