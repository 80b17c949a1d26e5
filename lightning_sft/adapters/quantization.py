"""QLoRA: frozen linear layers stored in 4 bits (NF4 or FP4) by bitsandbytes, on CPU or GPU.

``quantize_base`` swaps the selected frozen ``nn.Linear`` layers (the ``base_layer`` of LoRA
wrappers included) for ``bitsandbytes.nn.Linear4bit`` layers holding the same weights. Lightning's
``BitsandbytesPrecision`` is not used: it refuses non-CUDA accelerators and converts every
``nn.Linear`` it finds, so this module quantizes itself, layer by layer, on the layer's device.

``packed_weight`` gives a layer's packed storage as a ``kernels.nf4.Packed4bit``: contextual
sparsity's ``kernels.sparse_matmul`` and ``dequantize_rows`` / ``dequantize_cols`` decode only the
selected rows or columns from it (``nf4.decode``), bit for bit what bitsandbytes decodes for them.

bitsandbytes is imported only when a layer is quantized; ``is_quantized`` never imports it.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_sft.anatomy.linear import is_supported_linear, weight_is_transposed
from lightning_sft.adapters.targeting import ALL_LINEAR, TargetSpec, matches_spec, output_head_names, validate_target_spec
from lightning_sft.fingerprint import SOURCE_SAMPLE, tensor_sample
from lightning_sft.kernels import nf4
from lightning_sft.kernels.nf4 import Packed4bit

QUANT_TYPES = ("nf4", "fp4")
_COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MIN_VERSION = (0, 50)
INSTALL_HINT = "pip install 'bitsandbytes>=0.50'"
_WRAPPED = ".base_layer"


def _bnb() -> ModuleType:
    """bitsandbytes, imported on first need; a clear hint when it is missing or too old for CPU."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(f"4-bit quantization (QLoRA) needs bitsandbytes >= 0.50, which runs NF4 on CPU too:"
                          f" {INSTALL_HINT}. ({error})") from error
    version = tuple(int(part) for part in bitsandbytes.__version__.split(".")[:2] if part.isdigit())
    if version < _MIN_VERSION:
        raise ImportError(
            f"bitsandbytes {bitsandbytes.__version__} is too old: 4-bit layers on CPU need >= 0.50. {INSTALL_HINT}."
        )
    return bitsandbytes


def check_quant_type(quant_type: Any, argument: str = "quant_type") -> str:
    """``quant_type`` if it is one bitsandbytes stores in 4 bits; a ValueError with the choices otherwise."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(
            f"`{argument}` must be one of {', '.join(map(repr, QUANT_TYPES))} (4-bit NormalFloat, the QLoRA default,"
            f" or 4-bit float); got {quant_type!r}."
        )
    return quant_type


def _check_compute_dtype(compute_dtype: Any) -> torch.dtype | None:
    if compute_dtype is None:
        return None
    if isinstance(compute_dtype, str) and compute_dtype.removeprefix("torch.") in _COMPUTE_DTYPES:
        return _COMPUTE_DTYPES[compute_dtype.removeprefix("torch.")]
    if compute_dtype in _COMPUTE_DTYPES.values():
        return compute_dtype
    raise ValueError(
        f"`compute_dtype` must be None (each layer's own dtype), torch.float32, torch.bfloat16 or torch.float16;"
        f" got {compute_dtype!r}."
    )


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes ``Linear4bit`` whose weight is already packed in 4 bits. Never
    imports bitsandbytes: if it was not imported, no layer can be one."""
    bnb = sys.modules.get("bitsandbytes")
    linear4bit = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    if linear4bit is None or not isinstance(layer, linear4bit):
        return False
    weight = layer.weight
    return bool(getattr(weight, "bnb_quantized", False)) and getattr(weight, "quant_state", None) is not None


# -- choosing and quantizing layers ---------------------------------------------------------------


def _logical(name: str) -> str:
    """A module's name as it was before adapters wrapped it (``.base_layer`` dropped)."""
    return name.replace(_WRAPPED + ".", ".").removesuffix(_WRAPPED)


def _plan(model: nn.Module, target_modules: TargetSpec, quant_type: str,
          require_frozen: bool = True) -> list[tuple[str, nn.Module]]:
    """The ``(name, layer)`` pairs ``quantize_base`` would replace; raises on anything it cannot, changing nothing."""
    from lightning_sft.adapters.lora_layer import LoRALinear  # lora_layer imports this module

    modules = dict(model.named_modules())
    heads = {_logical(name) for name in output_head_names(model)}
    linear = [(name, module) for name, module in modules.items() if is_supported_linear(module)]
    if target_modules == ALL_LINEAR:
        selected = [(name, module) for name, module in linear if _logical(name) not in heads]
    else:
        selected = [(name, module) for name, module in linear if name and matches_spec(_logical(name), target_modules)]
    if not selected:
        raise ValueError(
            f"`target_modules={target_modules!r}` selects no linear layer of {type(model).__name__} to quantize"
            " ('all-linear' takes every nn.Linear except output heads)."
        )
    uses = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    for name, layer in selected:
        if not name:
            raise ValueError("quantize_base swaps layers inside a model; pass the module that holds the linear layer.")
        parent_name = name.rpartition(".")[0] if name.endswith(_WRAPPED) else None
        if is_quantized(layer):
            raise ValueError(f"{name} is already quantized; quantize a model once.")
        if weight_is_transposed(layer):
            raise TypeError(
                f"{name} is a transformers Conv1D (GPT-2 style, weight stored in x out); 4-bit quantization supports"
                " nn.Linear layers only. Quantize a model built from nn.Linear layers, or leave these layers out with"
                " `target_modules`."
            )
        if type(layer) is not nn.Linear:
            raise TypeError(
                f"{name} is a {type(layer).__name__}, not a plain nn.Linear; quantize_base only replaces nn.Linear"
                " layers (leave it out with `target_modules`)."
            )
        if parent_name is not None and not isinstance(modules.get(parent_name), LoRALinear):
            raise TypeError(
                f"{name} is wrapped by {type(modules.get(parent_name)).__name__}, which reads or trains the base weight"
                " itself (sparse fine-tuning); only the base layers of LoRA adapters can be stored in 4 bits."
            )
        weight = layer.weight
        if require_frozen and weight.requires_grad:
            raise ValueError(
                f"{name}.weight requires grad: 4-bit weights cannot be trained. Freeze the base first"
                " (inject_lora or model.requires_grad_(False)); adapters train beside the quantized base."
            )
        if not weight.is_floating_point() or weight.device.type == "meta":
            raise ValueError(f"{name}.weight is {weight.dtype} on {weight.device}; quantize a materialised float weight.")
        if uses[id(weight)] > 1:
            raise ValueError(
                f"{name}.weight is shared with another module (tied weights); quantizing it would untie them."
                " Exclude it with `target_modules`."
            )
        in_features = layer.in_features
        if weight.device.type == "cpu" and in_features % 2 == 0:
            bnb = _bnb()
            if not _cpu_kernel_agrees(bnb, in_features, quant_type, weight.dtype):
                raise ValueError(
                    f"{name}: bitsandbytes {bnb.__version__}'s CPU 4-bit kernel decodes rows of"
                    f" in_features={in_features} wrongly (a multiple of 16 that is not one of the block size 64), so the layer would compute"
                    " with wrong weights. Leave such layers out with `target_modules`, or quantize on CUDA."
                )
    return selected


_KERNEL_CHECKS: dict[tuple[int, str, torch.dtype], bool] = {}


def _cpu_kernel_agrees(bnb: ModuleType, in_features: int, quant_type: str, dtype: torch.dtype) -> bool:
    """Whether bitsandbytes' CPU 4-bit decoder reads rows of ``in_features`` entries as ``nf4.decode`` does.

    bitsandbytes 0.50.0-0.50.1's CPU kernel (even ``in_features``) misplaces the scales of rows that start inside a
    block: found for multiples of 16 but not of the block size (e.g. 32, 96, 176 with blocks of 64), where its
    forward computes with wrong weights (0.50.2 reads them right). A three-row probe per width checks the installed
    version (odd widths take its generic decoder, which is right)."""
    key = (in_features, quant_type, dtype)
    if key not in _KERNEL_CHECKS:
        probe = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        packed, state = bnb.functional.quantize_4bit(probe, compress_statistics=False, quant_type=quant_type)
        decoded = bnb.functional.dequantize_4bit(packed, state)
        _KERNEL_CHECKS[key] = torch.equal(decoded, nf4.decode(_packed(state, packed)))
    return _KERNEL_CHECKS[key]


def _fresh_layer(bnb: ModuleType, linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype | None,
                 double_quant: bool) -> nn.Module:
    """A ``Linear4bit`` holding ``linear``'s weight in 4 bits (quantized on its device) and its bias as it is."""
    weight = linear.weight
    options = dict(compress_statistics=double_quant, quant_type=quant_type, quant_storage=torch.uint8)
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype or weight.dtype, device="meta", **options)
    layer.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, module=layer, **options)
    if linear.bias is not None:
        layer.bias = linear.bias
    layer.weight = layer.weight.to(weight.device)  # Params4bit quantizes on its first move to a device
    # bitsandbytes repacks a CPU layer's weight for AVX512-BF16 on its first eval-mode no-grad forward, rounding the
    # scales to bf16 (lossy, and another layout): keep the standard one, which resumes and the decoders read.
    layer.support_avx512bf16_for_cpu = False
    # The original weight's fingerprint sample: adapters record the unquantized base they were trained on.
    layer.register_buffer(SOURCE_SAMPLE, tensor_sample(weight).clone())
    layer.register_load_state_dict_pre_hook(_load_quant_state)
    layer.train(linear.training)
    return layer


def quantize_base(model: nn.Module, quant_type: str = "nf4", compute_dtype: torch.dtype | str | None = None,
                  double_quant: bool = True, target_modules: TargetSpec = ALL_LINEAR) -> list[str]:
    """Store the selected frozen linear layers of ``model`` in 4 bits (QLoRA); returns their names.

    ``target_modules`` selects as LoRA's does, on names without ``.base_layer`` (``"all-linear"``:
    every nn.Linear except output heads and embedding-tied heads, adapted or not). Each layer becomes
    a ``bitsandbytes.nn.Linear4bit`` quantized on its current device; its bias stays as it was.
    ``compute_dtype`` (default: each layer's own dtype) is what the 4-bit weight is decoded to for
    matmuls; ``double_quant`` also quantizes the per-block scales (about 0.4 bit/param saved).
    Every layer is checked and built before the first swap, so a refusal changes nothing. GPT-2's
    Conv1D, trainable weights and already quantized layers are refused.
    """
    quant_type = check_quant_type(quant_type)
    dtype = _check_compute_dtype(compute_dtype)
    if not isinstance(double_quant, bool):
        raise ValueError(f"`double_quant` must be True or False; got {double_quant!r}.")
    validate_target_spec(target_modules, "target_modules")
    bnb = _bnb()
    selected = _plan(model, target_modules, quant_type)
    built = {name: _fresh_layer(bnb, layer, quant_type, dtype, double_quant) for name, layer in selected}
    for name, layer in built.items():
        model.set_submodule(name, layer)
    return list(built)


def check_quantizable(model: nn.Module, quant_type: str, target_modules: TargetSpec = ALL_LINEAR) -> None:
    """Every check ``quantize_base`` makes except the frozen-weight one, for a caller that freezes the base
    in between (the LoRA callback validates, injects adapters, then quantizes)."""
    check_quant_type(quant_type)
    _bnb()
    _plan(model, target_modules, quant_type, require_frozen=False)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every 4-bit layer under ``model`` by name."""
    return {name: module for name, module in model.named_modules() if is_quantized(module)}


def quantization_record(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized layer, the settings that rebuild it (kept in checkpoints so a load can quantize first)."""
    return {name: {"quant_type": layer.weight.quant_type, "double_quant": bool(layer.weight.compress_statistics),
                   "compute_dtype": str(layer.compute_dtype).removeprefix("torch.") if layer.compute_dtype else None}
            for name, layer in quantized_layers(model).items()}


def quantize_from_record(model: nn.Module, record: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Quantize exactly the layers ``record`` (``quantization_record``) names, with their settings."""
    groups: dict[tuple[str, bool, str | None], list[str]] = {}
    for name, spec in record.items():
        key = (spec["quant_type"], bool(spec["double_quant"]), spec.get("compute_dtype"))
        groups.setdefault(key, []).append(_logical(name))
    for (quant_type, _, _), names in groups.items():  # all groups are checked before any layer changes
        _plan(model, names, quant_type)
    done: list[str] = []
    for (quant_type, double_quant, compute_dtype), names in groups.items():
        done += quantize_base(model, quant_type, compute_dtype, double_quant, target_modules=names)
    return done


def _load_quant_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                      missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    """Load-state-dict pre-hook of a layer made by ``quantize_base``: bitsandbytes saves the quant state
    beside the packed weight (``weight.absmax``, ...) but does not load it back; this does, then the
    default loader copies the packed bytes."""
    stem = prefix + "weight."
    keys = [key for key in state_dict if key.startswith(stem)]
    weight = state_dict.get(prefix + "weight")
    if not keys:
        if isinstance(weight, Tensor) and weight.is_floating_point():
            error_msgs.append(
                f"{prefix}weight is a dense {weight.dtype} weight but {prefix.rstrip('.')} is stored in 4 bits: load"
                " the dense weights first and quantize afterwards (quantize_base, or LoRA(quantize=...) in a Trainer)."
            )
        return
    bnb = _bnb()
    items = {key[len(stem):]: state_dict.pop(key) for key in keys}
    state = bnb.functional.QuantState.from_dict(items, device=module.weight.device)
    if tuple(state.shape) != (module.out_features, module.in_features):
        error_msgs.append(f"{prefix}weight was quantized from a {tuple(state.shape)} weight, but this layer is"
                          f" ({module.out_features}, {module.in_features}).")
        return
    param = module.weight
    param.quant_state = module.quant_state = state
    param.blocksize, param.quant_type, param.compress_statistics = state.blocksize, state.quant_type, state.nested


# -- decoding ------------------------------------------------------------------------------------


def _storage(layer: nn.Module) -> tuple[Any, Tensor]:
    """The layer's quant state and its packed bytes (flat uint8), in bitsandbytes' standard layout."""
    if not is_quantized(layer):
        raise TypeError(
            f"{type(layer).__name__} is not a 4-bit quantized layer: expected a bitsandbytes Linear4bit after its"
            " weight was quantized (quantize_base)."
        )
    weight = layer.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # A Linear4bit not made by quantize_base, repacked by an eval-mode CPU forward: restore the standard layout.
        weight.data, state = _bnb().functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = layer.quant_state = state
    return state, weight.data.reshape(-1).view(torch.uint8)


def _packed(state: Any, data: Tensor, compute_dtype: torch.dtype | None = None) -> Packed4bit:
    """A bitsandbytes quant state and its packed bytes as a ``Packed4bit`` (the same tensors, no copy)."""
    nested = state.state2
    double = {} if not state.nested else dict(
        nested_code=nested.code, nested_absmax=nested.absmax, nested_blocksize=int(nested.blocksize), offset=state.offset
    )
    out_features, in_features = (int(size) for size in state.shape)
    return Packed4bit(data.reshape(-1).view(torch.uint8), state.absmax, state.code, int(state.blocksize),
                      (out_features, in_features), state.dtype, compute_dtype, **double)


def packed_weight(layer: nn.Module) -> Packed4bit:
    """A 4-bit layer's weight as a ``kernels.nf4.Packed4bit``, computing in the layer's compute dtype: what
    ``kernels.sparse_matmul`` and ``nf4.decode`` take. A TypeError for a layer that is not 4-bit."""
    return _packed(*_storage(layer), compute_dtype=layer.compute_dtype)


def dequantize_weight(layer: nn.Module) -> Tensor:
    """The whole (out, in) weight of a 4-bit layer, in its original dtype (bitsandbytes' own decoder)."""
    state, _ = _storage(layer)
    return _bnb().functional.dequantize_4bit(layer.weight.data, state)


def dequantize_rows(layer: nn.Module, idx: Tensor) -> Tensor:
    """``W[idx]`` (output channels ``idx``, shape ``len(idx) x in``), decoding only those rows."""
    return nf4.decode(packed_weight(layer), rows=idx, check=True)


def dequantize_cols(layer: nn.Module, idx: Tensor) -> Tensor:
    """``W[:, idx]`` (input channels ``idx``, shape ``out x len(idx)``), decoding only those columns."""
    return nf4.decode(packed_weight(layer), cols=idx, check=True)


def quantized_bytes(layer: nn.Module) -> int:
    """Bytes a 4-bit layer's weight occupies: packed codes plus every quant-state tensor (scales, their
    nested scales and offset, and the 16- and 256-entry code tables); the bias is not counted."""
    packed = packed_weight(layer)
    tensors = [packed.data, packed.absmax, packed.code, packed.offset, packed.nested_absmax, packed.nested_code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def quantized_linear(layer: nn.Module, x: Tensor, bias: bool = True) -> Tensor:
    """``x @ W^T (+ b)`` with the whole weight decoded, in the layer's compute dtype and returned in
    ``x``'s (the dtype rule of ``Linear4bit.forward``); for the rare dense evaluations (calibration)."""
    dtype = layer.compute_dtype or x.dtype
    b = layer.bias.to(dtype) if bias and layer.bias is not None else None
    return F.linear(x.to(dtype), dequantize_weight(layer).to(dtype), b).to(x.dtype)


# -- the dense view estimators read ----------------------------------------------------------------


class DequantizedWeight(Tensor):
    """A 4-bit layer's weight seen as its dense (out, in) matrix, decoded afresh by every operation.

    Channel estimators keep their block's weights for the whole run; holding dense copies of every
    sparse layer's weights would undo what 4-bit storage saves. This view has the shape, dtype and
    device of the dense weight and no storage: ``svd_factors`` and friends decode it once (one
    layer at a time) when they read it, and shape checks never decode it.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, layer: nn.Module) -> DequantizedWeight:
        packed = packed_weight(layer)
        view = Tensor._make_wrapper_subclass(cls, packed.shape, dtype=packed.dtype, device=packed.device,
                                             requires_grad=False)
        view._layer = layer
        return view

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        def dense(value: Any) -> Any:
            return dequantize_weight(value._layer) if isinstance(value, DequantizedWeight) else value

        return func(*tree_map(dense, args), **tree_map(dense, kwargs or {}))

    def __deepcopy__(self, memo: dict[int, Any]) -> DequantizedWeight:
        """A view of the copied layer (a deep copy of a wrapped model carries its estimators along)."""
        return DequantizedWeight(copy.deepcopy(self._layer, memo))

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"DequantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


def dense_view(layer: nn.Module) -> Tensor:
    """A frozen linear layer's weight as estimators read it: the parameter itself, or for a 4-bit layer a
    ``DequantizedWeight`` that decodes on use."""
    return DequantizedWeight(layer) if is_quantized(layer) else layer.weight
