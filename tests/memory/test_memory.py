"""The memory model: shapes from configs, the estimate against measured training steps, the
planner's choices, and the errors bad input gets."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from lightning_sft.bench import memory as memory_bench
from lightning_sft.bench.memory_harness import measure
from lightning_sft.memory import PRESETS, NothingFits, TrainingSetup, estimate, hf_config, model_shape, plan
from lightning_sft.cli.plan import main as plan_main
from lightning_sft.cli.plan import parse_size
from lightning_sft.memory.tracker import LiveTensors, SavedForBackward

pytestmark = pytest.mark.usefixtures("one_thread")

GIB = 2**30
TINY = {
    "llama": memory_bench.MODELS["llama"],
    "qwen2": memory_bench.MODELS["qwen2"],
    "gpt2": memory_bench.MODELS["gpt2"],
    "gemma": {"model_type": "gemma", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32},
    "phi3": {"model_type": "phi3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "pad_token_id": 0},
}


@pytest.fixture(autouse=True)
def quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


# Shapes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(TINY))
def test_parameter_count_matches_the_transformers_model(family: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(TINY[family]))
    assert model_shape(TINY[family]).num_params() == sum(p.numel() for p in model.parameters())
    assert model_shape(hf_config(TINY[family])) == model_shape(TINY[family])


@pytest.mark.parametrize(
    ("preset", "billions"),
    [("llama-3.1-8b", 8.03), ("llama-2-7b", 6.74), ("mistral-7b", 7.25), ("qwen2.5-7b", 7.62), ("gpt2", 0.124), ("gemma-2b", 2.51)],
)
def test_presets_have_the_published_sizes(preset: str, billions: float) -> None:
    assert model_shape(preset).num_params() / 1e9 == pytest.approx(billions, rel=0.005)


def test_config_json_and_model_directory(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["mistral-7b"]))
    assert model_shape(tmp_path) == model_shape(tmp_path / "config.json") == model_shape("mistral-7b")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("no-such-model", "Unknown model 'no-such-model'.*preset"),
        ({"vocab_size": 10}, "needs a 'model_type'"),
        ({"model_type": "t5"}, "not modelled yet"),
        ({"model_type": "llama", "hidden_size": 64}, "lacks vocab_size"),
        ({**TINY["llama"], "hidden_size": -64}, "`hidden` must be an integer >= 1"),
    ],
)
def test_bad_configs_are_refused(config, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model_shape(config)


# The tracker ------------------------------------------------------------------------------------------


def test_live_tensors_counts_storages_once_and_frees_them() -> None:
    tracker = LiveTensors()
    with tracker:
        a = torch.ones(1000)
        view = a[10:].view(-1, 10)  # a view: no new bytes
        b = a * 2
        assert tracker.live == 8000
        del a, b
        assert tracker.live == 4000  # the view keeps a's storage alive
        del view
    assert tracker.live == 0 and tracker.peak == 8000


def test_live_tensors_counts_host_copies_apart() -> None:
    outside = torch.ones(10)
    tracker = LiveTensors()
    with tracker:
        a, host = torch.ones(1000), torch.zeros(500)
        tracker.to_host(host)
        assert (tracker.live, tracker.host_live) == (4000, 2000)
        with pytest.raises(ValueError, match="created inside the tracker, once"):
            tracker.to_host(host)
        with pytest.raises(ValueError, match="created inside the tracker"):
            tracker.to_host(outside)
        del host
        assert tracker.host_live == 0 and tracker.live == 4000
    del a
    assert tracker.peak == 6000 and tracker.host_peak == 2000  # a copy counts on the device until it is moved


def test_saved_for_backward_leaves_out_parameters() -> None:
    layer = torch.nn.Linear(16, 32)
    x = torch.randn(8, 16, requires_grad=True)
    with SavedForBackward(exclude=[p.untyped_storage()._cdata for p in layer.parameters()]) as saved:
        y = torch.relu(layer(x))
    assert saved.total() == x.nbytes + y.nbytes  # linear keeps x, relu keeps its output


# The estimate against measurement ----------------------------------------------------------------


MEASURED = [
    ("llama", {"method": "full", "precision": "32-true", "attention": "eager"}),
    ("llama", {"method": "lora", "precision": "bf16-true", "attention": "sdpa"}),
    ("llama", {"method": "sft", "precision": "32-true", "attention": "sdpa", "optimizer": "sgd"}),
    ("gpt2", {"method": "lora", "precision": "32-true", "attention": "eager"}),
    # the recipes, switched on by their callbacks
    ("llama", {"method": "qlora", "precision": "bf16-true", "attention": "sdpa"}),
    ("llama", {"method": "full", "precision": "bf16-true", "attention": "sdpa", "optimizer": "adamw8bit"}),
    ("llama", {"method": "lora", "precision": "bf16-true", "attention": "sdpa", "gradient_checkpointing": True}),
    # the fused loss (FusedCrossEntropy) at a 32k vocabulary, where the logits would dominate
    ("llama-32k", {"method": "lora", "precision": "32-true", "attention": "sdpa", "batch": 2, "seq": 512, "fused_ce": True}),
    ("llama-32k", {"method": "lora", "precision": "bf16-true", "attention": "sdpa", "batch": 2, "seq": 512,
                   "fused_ce": True}),
]


@pytest.mark.parametrize(("model", "options"), MEASURED, ids=[memory_bench._describe(o) for _, o in MEASURED])
def test_estimate_matches_a_measured_step(model: str, options: dict) -> None:
    row = memory_bench.compare(model, options, batch=4, seq=64)  # the bench shape (docs/memory.md)
    for component, error in row["errors"].items():
        assert abs(error) <= 0.05, (component, row["measured"][component], row["estimated"][component])
    assert abs(row["peak"]["error"]) <= 0.10
    assert row["phase"]["measured"] == row["phase"]["estimated"]
    retained = row["measured"]["activations"] + row["measured"]["logits"]
    if options.get("fused_ce"):  # the fused loss holds its gradients of the hidden states on the autograd context
        retained -= options["batch"] * options["seq"] * 128 * (4 if options["precision"] == "32-true" else 2)
    if not options.get("gradient_checkpointing"):  # then what the graph retains is exactly what autograd saved
        assert retained == pytest.approx(row["saved_for_backward"], rel=0.01)


@pytest.mark.parametrize(
    ("recipe", "component", "most"),
    [
        ({"method": "qlora"}, "weights", 0.8),
        ({"gradient_checkpointing": True}, "activations", 0.15),
        ({"optimizer": "adamw8bit", "method": "full"}, "optimizer", 0.6),
    ],
)
def test_each_recipe_shrinks_its_measured_component(recipe: dict, component: str, most: float) -> None:
    """Measured with the recipe's callback on, against the same run without it (LoRA, or full FT for
    the optimizer); the estimate predicts the same ratio."""
    base = TrainingSetup(method=recipe.get("method", "lora") if "optimizer" in recipe else "lora", batch=4, seq=64,
                         precision="bf16-true", device="cpu")
    changed = base.with_(**recipe)
    model = memory_bench.MODELS["llama"]
    before, after = (memory_bench.measured_sizes(measure(model, s))[component] for s in (base, changed))
    assert after < most * before
    predicted = estimate(model, changed).sizes[component] / estimate(model, base).sizes[component]
    assert predicted == pytest.approx(after / before, rel=0.05)


def test_sdpa_keeps_less_than_eager_as_predicted() -> None:
    eager, sdpa = (TrainingSetup(method="lora", batch=2, seq=64, precision="32-true", attention=a, device="cpu") for a in ("eager", "sdpa"))
    measured = measure(TINY["llama"], eager).activations_total - measure(TINY["llama"], sdpa).activations_total
    predicted = estimate(TINY["llama"], eager).sizes["activations"] - estimate(TINY["llama"], sdpa).sizes["activations"]
    assert measured > 0 and predicted == pytest.approx(measured, rel=0.01)


# The model's arithmetic ------------------------------------------------------------------------------


def test_mixed_precision_adam_is_16_bytes_per_parameter_and_zero_shards_it() -> None:
    shape = model_shape("llama-3.1-8b")
    params = shape.num_params()
    full = estimate(shape, method="full", precision="bf16-mixed")
    states = full.sizes["weights"] + full.sizes["gradients"] + full.sizes["optimizer"]
    assert states / params == pytest.approx(16, rel=0.001)
    n = 8
    for stage, sharded in [(1, ("optimizer",)), (2, ("optimizer", "gradients")), (3, ("optimizer", "gradients", "weights"))]:
        zero = estimate(shape, method="full", precision="bf16-mixed", zero_stage=stage, gpus=n)
        for part in ("weights", "gradients", "optimizer"):
            expected = full.sizes[part] / n if part in sharded else full.sizes[part]
            assert zero.sizes[part] == pytest.approx(expected, rel=0.001), (stage, part)


def test_recipes_move_the_estimate_the_right_way() -> None:
    base = TrainingSetup(method="lora", batch=4, seq=2048)
    shape = model_shape("llama-3.1-8b")
    lora = estimate(shape, base)
    assert estimate(shape, base.with_(method="qlora")).sizes["weights"] < 0.4 * lora.sizes["weights"]
    assert estimate(shape, base.with_(gradient_checkpointing=True)).sizes["activations"] < 0.1 * lora.sizes["activations"]
    assert estimate(shape, base.with_(attention="eager")).sizes["activations"] > lora.sizes["activations"]
    assert estimate(shape, base.with_(optimizer="adamw8bit")).sizes["optimizer"] < 0.6 * lora.sizes["optimizer"]
    assert estimate(shape, base.with_(layer_dropout=0.5)).sizes["activations"] < 0.6 * lora.sizes["activations"]
    assert estimate(shape, base.with_(method="full")).sizes["gradients"] > 100 * lora.sizes["gradients"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"batch": -1}, "`batch` must be an integer >= 1"),
        ({"seq": 0}, "`seq` must be an integer >= 1"),
        ({"method": "prefix"}, "method must be one of"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"zero_stage": 2}, "set gpus > 1"),
        ({"zero_stage": 4, "gpus": 2}, "zero_stage must be"),
        ({"sft_density": 0}, "sft_density must be in"),
        ({"method": "qlora", "precision": "32-true"}, "QLoRA computes in 16-bit"),
    ],
)
def test_bad_setups_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainingSetup(**options)


# The planner --------------------------------------------------------------------------------------


def test_planner_recommends_the_fastest_recipe_that_fits() -> None:
    small = plan("llama-3.1-8b", 24 * GIB, seq=2048, batch=4)
    assert all(r.estimate.peak <= 23 * GIB for r in small.recipes if r.fits)
    # Without the logits of a 128k vocabulary (fused CE), bf16 LoRA's 15 GiB of weights fit and need no
    # dequantization, so it beats QLoRA; with them, only QLoRA fits.
    best = small.recommended.setup
    assert best.method == "lora" and best.fused_ce and best.gradient_checkpointing and small.recommended.fits
    assert not any(r.setup.method == "lora" and r.fits and not r.setup.fused_ce for r in small.recipes)
    unfused = plan("llama-3.1-8b", 24 * GIB, seq=2048, batch=4, methods=("qlora",))
    qlora = {r.setup.fused_ce: r.estimate for r in unfused.recipes if r.setup.optimizer == "adamw8bit"
             and r.setup.gradient_checkpointing}
    assert qlora[True].peak < 0.5 * qlora[False].peak and qlora[True].at_peak["logits"] == 0
    large = plan("llama-3.1-8b", 80 * GIB, seq=2048, batch=4)
    assert large.recommended.setup.method == "lora" and not large.recommended.setup.gradient_checkpointing
    assert large.recommended.speed == 1.0 and "--lora.r 16" in large.recommended.flags()


def test_planner_says_what_would_fit_when_nothing_does() -> None:
    with pytest.raises(NothingFits, match="No recipe fits 24.0 GiB.*It would fit with --gpus"):
        plan("llama-3.1-70b", 24 * GIB)
    # Batch 16 fits only by offloading its checkpointed block inputs (8 GiB of host memory).
    with pytest.raises(NothingFits, match="It would fit with --batch 8 or --seq 1024"):
        plan("llama-3.1-8b", 24 * GIB, seq=2048, batch=16, methods=("lora",), host_memory=4 * GIB)


def test_planner_weighs_activation_offloading_with_its_copies_and_host_memory() -> None:
    offloaded = plan("llama-3.1-8b", 24 * GIB, seq=2048, batch=16, methods=("lora",)).recommended
    assert offloaded.setup.offload_activations and offloaded.setup.gradient_checkpointing
    assert offloaded.estimate.host == 32 * 8 * 2048 * 4096 * 2 * 2  # each block's bf16 input, in powers of two
    assert "--offload-activations on" in offloaded.flags()
    # Where bf16 LoRA fits either way, offloading's copies are not worth their cost; where it fits only with
    # them (18 GB), they beat QLoRA.
    assert not plan("llama-3.1-8b", 24 * GIB, seq=2048, batch=4).recommended.setup.offload_activations
    small = plan("llama-3.1-8b", 18 * GIB, seq=2048, batch=4)
    assert small.recommended.setup.method == "lora" and small.recommended.setup.offload_activations
    qlora = max(r.speed for r in small.recipes if r.setup.method == "qlora" and r.fits)
    assert qlora < 0.8 < small.recommended.speed
    # Offloading every saved tensor of an 8B model moves ~49 GiB each way: bound by the host link.
    everything = next(r for r in plan("llama-3.1-8b", 24 * GIB, seq=2048, batch=4).recipes
                      if r.setup.offload_activations and not r.setup.gradient_checkpointing and r.setup.method == "lora")
    assert everything.estimate.host > 40 * GIB and everything.speed < 0.3
    with pytest.raises(ValueError, match="host_memory must be a positive number"):
        plan("llama-3.1-8b", 24 * GIB, host_memory=0)


def test_offloaded_host_memory_is_rounded_to_powers_of_two_on_cuda_only() -> None:
    setup = TrainingSetup(method="lora", batch=3, seq=100, offload_activations=True, offload_min_bytes=0)
    cuda, cpu = estimate("llama-2-7b", setup), estimate("llama-2-7b", setup.with_(device="cpu"))
    assert cpu.host == cpu.offloaded and cuda.host > cuda.offloaded  # 300 tokens: no size is a power of two
    assert cuda.peak < estimate("llama-2-7b", setup.with_(offload_activations=False)).peak
    kept = estimate("llama-2-7b", setup.with_(offload_min_bytes=2**40))  # nothing is that large: nothing moves
    assert kept.host == 0 and kept.sizes["activations"] == estimate("llama-2-7b", setup.with_(offload_activations=False)).sizes["activations"]


def test_plan_cli(capsys) -> None:
    assert plan_main(["--model", "llama-3.1-8b", "--gpu-mem", "24GB", "--gpus", "1", "--seq", "2048", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "Recommended: LoRA + checkpointing + 8-bit AdamW + fused CE" in out and "--fused-ce on" in out
    assert plan_main(["--model", "gpt2", "--gpu-mem", "16GB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["recipes"][0]["recipe"] == result["recommended"] and result["recipes"][0]["fits"]
    assert plan_main(["--model", "llama-3.1-70b", "--gpu-mem", "24GB"]) == 1
    assert "would fit with" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "nope", "--gpu-mem", "24GB"],
        ["--model", "gpt2", "--gpu-mem=-3GB"],
        ["--model", "gpt2", "--gpu-mem", "24 parsecs"],
        ["--model", "gpt2", "--gpu-mem", "24GB", "--batch", "0"],
        ["--model", "gpt2", "--gpu-mem", "24GB", "--methods", "full,prefix"],
        ["--model", "gpt2", "--gpu-mem", "0.5GB"],
    ],
)
def test_plan_cli_usage_errors(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        plan_main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_sizes_are_binary() -> None:
    assert parse_size("24GB") == parse_size("24GiB") == parse_size("24") == 24 * GIB
    assert parse_size("16000MB") == 16000 * 2**20
