"""QLoRA: frozen linear layers stored in 4 bits (NF4 or FP4) by bitsandbytes, on CPU or GPU.

``quantize_base`` swaps the selected frozen ``nn.Linear`` layers (the ``base_layer`` of LoRA
wrappers included) for ``bitsandbytes.nn.Linear4bit`` layers holding the same weights. Lightning's
``BitsandbytesPrecision`` is not used: it refuses non-CUDA accelerators and converts every
``nn.Linear`` it finds, so this module quantizes itself, layer by layer, on the layer's device.

Contextual sparsity needs only some rows or columns of a frozen weight per step; decoding the
whole matrix for that would cost as much as the dense product it saves. ``dequantize_rows`` and
``dequantize_cols`` decode only the selected entries from the packed storage, bit for bit what
``bitsandbytes.functional.dequantize_4bit`` gives for them. Storage (``Params4bit``): W (out x in)
flattened row-major, two 4-bit codes per byte (even flat index in the high nibble), one scale
(absmax) per ``blocksize`` consecutive flat entries: fp32, or with double quantization uint8 codes
of a 256-entry table times one fp32 scale per 256 blocks, plus a global offset.

bitsandbytes is imported only when a layer is quantized; ``is_quantized`` never imports it.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_sft.anatomy.linear import is_supported_linear, weight_is_transposed
from lightning_sft.adapters.targeting import ALL_LINEAR, TargetSpec, output_head_names, validate_target_spec
from lightning_sft.fingerprint import SOURCE_SAMPLE, tensor_sample
from lightning_sft.kernels.dispatch import keep_slice

QUANT_TYPES = ("nf4", "fp4")
_COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MIN_VERSION = (0, 50)
INSTALL_HINT = "pip install 'bitsandbytes>=0.50'"
_WRAPPED = ".base_layer"
_QUANT_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _bnb() -> ModuleType:
    """bitsandbytes, imported on first need; a clear hint when it is missing or too old for CPU."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(
            f"4-bit quantization (QLoRA) needs bitsandbytes >= 0.50, which runs NF4 on CPU too: {INSTALL_HINT}."
            f" ({error})"
        ) from error
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
    """Whether ``layer`` is a bitsandbytes ``Linear4bit`` whose weight is already packed in 4 bits.

    Never imports bitsandbytes: if it was not imported, no layer can be one.
    """
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


def _matches(name: str, spec: TargetSpec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in spec)


def _plan(
    model: nn.Module, target_modules: TargetSpec, quant_type: str, require_frozen: bool = True
) -> list[tuple[str, nn.Module]]:
    """The ``(name, layer)`` pairs ``quantize_base`` would replace; raises on anything it cannot, changing nothing."""
    from lightning_sft.adapters.lora_layer import LoRALinear  # lora_layer imports this module

    modules = dict(model.named_modules())
    heads = {_logical(name) for name in output_head_names(model)}
    linear = [(name, module) for name, module in modules.items() if is_supported_linear(module)]
    if target_modules == ALL_LINEAR:
        selected = [(name, module) for name, module in linear if _logical(name) not in heads]
    else:
        selected = [(name, module) for name, module in linear if name and _matches(_logical(name), target_modules)]
    if not selected:
        raise ValueError(
            f"`target_modules={target_modules!r}` selects no linear layer of {type(model).__name__} to quantize"
            " ('all-linear' takes every nn.Linear except output heads)."
        )
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
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
            raise ValueError(
                f"{name}.weight is {weight.dtype} on {weight.device}; quantize a materialised float weight."
            )
        if uses.get(id(weight), 0) > 1:
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
    """Whether bitsandbytes' CPU 4-bit decoder reads rows of ``in_features`` entries as they are stored.

    bitsandbytes 0.50's CPU kernel (even ``in_features``) misplaces the scales of rows that start
    inside a block: found here for ``in_features`` multiples of 16 but not of the block size (e.g.
    32, 96, 176 with blocks of 64), where its forward computes with wrong weights. A three-row probe
    per width checks the installed version against the storage format (odd widths take its
    generic decoder, which is right).
    """
    key = (in_features, quant_type, dtype)
    if key not in _KERNEL_CHECKS:
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(3, in_features, generator=generator).to(dtype)
        packed, state = bnb.functional.quantize_4bit(probe, compress_statistics=False, quant_type=quant_type)
        decoded = bnb.functional.dequantize_4bit(packed, state)
        _KERNEL_CHECKS[key] = torch.equal(decoded, _decode_packed(state, packed.reshape(-1), None, None))
    return _KERNEL_CHECKS[key]


def _fresh_layer(bnb: ModuleType, linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype | None,
                 double_quant: bool) -> nn.Module:
    """A ``Linear4bit`` holding ``linear``'s weight in 4 bits (quantized on its device) and its bias as it is."""
    weight = linear.weight
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant, quant_type=quant_type,
        quant_storage=torch.uint8, device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach(), requires_grad=False, compress_statistics=double_quant, quant_type=quant_type,
        quant_storage=torch.uint8, module=layer,
    )
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


def quantize_base(
    model: nn.Module,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | str | None = None,
    double_quant: bool = True,
    target_modules: TargetSpec = ALL_LINEAR,
) -> list[str]:
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
    return {
        name: {
            "quant_type": layer.weight.quant_type,
            "double_quant": bool(layer.weight.compress_statistics),
            "compute_dtype": str(layer.compute_dtype).removeprefix("torch.") if layer.compute_dtype else None,
        }
        for name, layer in quantized_layers(model).items()
    }


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
        error_msgs.append(
            f"{prefix}weight was quantized from a {tuple(state.shape)} weight, but this layer is"
            f" ({module.out_features}, {module.in_features})."
        )
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


def _absmax_at(state: Any, blocks: Tensor) -> Tensor:
    """The fp32 scales of ``blocks`` (any shape), decoding double-quantized scales for those blocks only."""
    if not state.nested:
        return state.absmax.float()[blocks]
    nested = state.state2
    codes = state.absmax[blocks].long()
    return nested.code[codes] * nested.absmax[blocks // nested.blocksize] + state.offset


def _decode(layer: nn.Module, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """``W[rows][:, cols]`` (None: all) of a 4-bit layer, decoding only those entries, in the weight's dtype."""
    return _decode_packed(*_storage(layer), rows, cols)


def _decode_packed(state: Any, packed: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """``_decode`` on a quant state and its flat packed bytes.

    The code of flat entry ``f = i * in + j`` is the high nibble of byte ``f // 2`` for even ``f``,
    the low one for odd; its scale is block ``f // blocksize``. Rows with an even width and
    ``blocksize``-aligned rows take the fast paths (whole bytes / whole blocks per row).
    """
    out_features, in_features = (int(size) for size in state.shape)
    size = int(state.blocksize)
    device = packed.device
    row_idx = rows if rows is not None else torch.arange(out_features, device=device)
    col_idx = cols if cols is not None else torch.arange(in_features, device=device)
    n_rows, n_cols = row_idx.numel(), col_idx.numel()
    table = state.code.to(device, torch.float32)
    if in_features % 2 == 0:
        grid = packed.view(out_features, in_features // 2)
        if rows is not None:
            grid = grid.index_select(0, rows)
        if cols is None:  # whole bytes: one lookup of both codes per byte
            pairs = torch.stack((table.repeat_interleave(16), table.repeat(16)), dim=1)
            codes = pairs[grid.long()].view(n_rows, in_features)
        else:
            shift = ((cols & 1) ^ 1).mul(4).to(torch.uint8)
            codes = table[((grid.index_select(1, cols >> 1) >> shift) & 15).long()]
    else:
        flat = row_idx[:, None] * in_features + col_idx[None, :]
        shift = ((flat & 1) ^ 1).mul(4).to(torch.uint8)
        codes = table[((packed[flat >> 1] >> shift) & 15).long()]
    if in_features % size == 0:
        per_row = in_features // size
        if cols is None:
            blocks = row_idx[:, None] * per_row + torch.arange(per_row, device=device)
            values = (codes.view(n_rows, per_row, size) * _absmax_at(state, blocks)[..., None]).view(n_rows, n_cols)
        else:
            values = codes * _absmax_at(state, row_idx[:, None] * per_row + (cols // size)[None, :])
    else:
        values = codes * _absmax_at(state, (row_idx[:, None] * in_features + col_idx[None, :]) // size)
    return values.to(state.dtype)


def _check_index(layer: nn.Module, idx: Tensor, limit: int, what: str) -> None:
    if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
        got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"{what} indices must be a 1-D int64 tensor; got {got}. Use dtype=torch.long.")
    if idx.device != layer.weight.device:
        raise ValueError(f"{what} indices are on {idx.device} but the layer is on {layer.weight.device}.")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
        raise ValueError(f"{what} indices must lie in [0, {limit}); got min {int(idx.min())}, max {int(idx.max())}.")


def dequantize_weight(layer: nn.Module) -> Tensor:
    """The whole (out, in) weight of a 4-bit layer, in its original dtype (bitsandbytes' own decoder)."""
    state, _ = _storage(layer)
    return _bnb().functional.dequantize_4bit(layer.weight.data, state)


def dequantize_rows(layer: nn.Module, idx: Tensor) -> Tensor:
    """``W[idx]`` (output channels ``idx``, shape ``len(idx) x in``), decoding only those rows."""
    _storage(layer)
    _check_index(layer, idx, layer.out_features, "row")
    return _decode(layer, idx, None)


def dequantize_cols(layer: nn.Module, idx: Tensor) -> Tensor:
    """``W[:, idx]`` (input channels ``idx``, shape ``out x len(idx)``), decoding only those columns."""
    _storage(layer)
    _check_index(layer, idx, layer.in_features, "column")
    return _decode(layer, None, idx)


def quantized_bytes(layer: nn.Module) -> int:
    """Bytes a 4-bit layer's weight occupies: packed codes plus every quant-state tensor (scales, their
    nested scales and offset, and the 16- and 256-entry code tables); the bias is not counted."""
    state, packed = _storage(layer)
    tensors = [packed, state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def _compute_dtype(layer: nn.Module, x: Tensor) -> torch.dtype:
    """The dtype a 4-bit layer computes in, as its own forward does: its compute dtype, else the input's."""
    return layer.compute_dtype or x.dtype


def quantized_linear(layer: nn.Module, x: Tensor, bias: bool = True) -> Tensor:
    """``x @ W^T (+ b)`` with the whole weight decoded, in the layer's compute dtype and returned in
    ``x``'s (the dtype rule of ``Linear4bit.forward``); for the rare dense evaluations (calibration)."""
    dtype = _compute_dtype(layer, x)
    b = layer.bias.to(dtype) if bias and layer.bias is not None else None
    return F.linear(x.to(dtype), dequantize_weight(layer).to(dtype), b).to(x.dtype)


def _decode_slice(kind: str, layer: nn.Module, idx: Tensor) -> Tensor:
    return _decode(layer, idx, None) if kind == "rows" else _decode(layer, None, idx)


class _QuantizedSliceMatmul(torch.autograd.Function):
    """``a @ W[idx].T + b[idx]`` (rows) or ``a @ W[:, idx].T + b`` (cols) over a frozen 4-bit weight:
    only the selected slice is decoded, in forward and (unless kept) again in backward."""

    @staticmethod
    def forward(ctx: Any, kind: str, a: Tensor, layer: nn.Module, idx: Tensor, bias: Tensor | None) -> Tensor:
        dtype = _compute_dtype(layer, a)
        w = _decode_slice(kind, layer, idx).to(dtype)
        b = None if bias is None else (bias.index_select(0, idx) if kind == "rows" else bias).to(dtype)
        out = F.linear(a.to(dtype), w, b).to(a.dtype)
        keep = ctx.needs_input_grad[1] and keep_slice(a.shape[0], w.shape[1], w.shape[0])
        ctx.kind, ctx.layer, ctx.dtype, ctx.a_dtype = kind, layer, dtype, a.dtype
        if bias is not None:
            ctx.bias_dtype, ctx.bias_len = bias.dtype, bias.numel()
        ctx.save_for_backward(idx, w if keep else None)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        idx, w = ctx.saved_tensors
        grad_a = grad_bias = None
        if ctx.needs_input_grad[1]:
            if w is None:
                w = _decode_slice(ctx.kind, ctx.layer, idx).to(ctx.dtype)
            grad_a = (g.to(ctx.dtype) @ w).to(ctx.a_dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
            if ctx.kind == "rows":  # dropped output channels get no gradient, as in the dense model
                grad_bias = grad_bias.new_zeros(ctx.bias_len).index_copy_(0, idx, grad_bias)
        return None, grad_a, None, None, grad_bias


def _slice_matmul(kind: str, a: Tensor, layer: nn.Module, idx: Tensor) -> Tensor:
    flat = a.reshape(a.shape[:-1].numel(), a.shape[-1])
    out = _QuantizedSliceMatmul.apply(kind, flat, layer, idx, layer.bias)
    return out.reshape(*a.shape[:-1], out.shape[-1])


def quantized_rows_matmul(x: Tensor, layer: nn.Module, idx: Tensor) -> Tensor:
    """``x @ W[idx].T (+ bias[idx])`` of a 4-bit layer: output channels ``idx`` only, decoding only those rows.
    Gradients reach ``x`` (and a trainable bias), never the frozen weight."""
    return _slice_matmul("rows", x, layer, idx)


def quantized_cols_matmul(h: Tensor, layer: nn.Module, idx: Tensor) -> Tensor:
    """``h @ W[:, idx].T (+ bias)`` of a 4-bit layer, ``h`` holding input channels ``idx`` only; decodes only
    those columns."""
    return _slice_matmul("cols", h, layer, idx)


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
        state, packed = _storage(layer)
        view = Tensor._make_wrapper_subclass(cls, tuple(int(s) for s in state.shape), dtype=state.dtype,
                                             device=packed.device, requires_grad=False)
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
