"""Low-rank (SVD) factors of frozen weights and their on-disk cache, used by the SVD channel
estimator. The cache format is described in ``docs/sparsity_estimators.md``."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from safetensors.torch import save_file
from torch import Tensor

from lightning_sft.atomic_io import atomic_path
from lightning_sft.fingerprint import fingerprint_tensors


# -- low-rank factors and their on-disk cache -----------------------------------------------------


@dataclass(frozen=True, eq=False)
class LowRankFactors:
    """``W^T ~ A @ B`` in fp32: ``A`` (in x r) = U_r sqrt(S_r), ``B`` (r x out) = sqrt(S_r) V_r^T."""

    A: Tensor
    B: Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def project(self, x: Tensor) -> Tensor:
        """Approximate ``x @ W^T`` at cost ``r * (in + out)`` per row instead of ``in * out``."""
        return (x @ self.A) @ self.B

    def to(self, device: torch.device | str) -> LowRankFactors:
        return LowRankFactors(self.A.to(device), self.B.to(device))


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}.")


_EXACT_SVD_MAX_DIM = 1024


def top_singular(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``rank`` singular triplets ``(U_r, S_r, Vh_r)`` of a 2-D fp32/fp64 ``matrix``.

    Exact up to ``min(shape) <= 1024``; above it randomized (``torch.svd_lowrank``, oversampled, 4
    power iterations), since a full SVD of a 5632 x 2048 weight takes about a minute on a CPU while
    only 8 triplets are needed. The sketch uses a fixed seed and leaves the global RNG untouched, so
    factors are reproducible and training randomness does not shift.
    """
    r = min(rank, min(matrix.shape))
    if min(matrix.shape) <= _EXACT_SVD_MAX_DIM:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    with torch.random.fork_rng(devices=[matrix.device] if matrix.is_cuda else []):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=min(2 * r + 10, min(matrix.shape)), niter=4)
    return u[:, :r], s[:r], v[:, :r].T


def svd_factors(weight: Tensor, rank: int) -> LowRankFactors:
    """Rank-``rank`` truncated SVD of a frozen ``weight`` (out x in), computed and stored in fp32.

    ``rank`` is clamped to ``min(out, in)``, where the factors reproduce the weight exactly. Always
    fp32 (the reference cast factors to the 4-bit base's storage dtype and degenerated).
    """
    _check_rank(rank)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}.")
    u, s, vh = top_singular(weight.detach().float().T, rank)
    root = s.sqrt()
    return LowRankFactors((u * root).contiguous().cpu(), (root[:, None] * vh).contiguous().cpu())


def whitened_factors(weight: Tensor, gram: Tensor, tokens: int, rank: int, ridge: float = 1e-4) -> LowRankFactors:
    """Rank-``rank`` factors that best reproduce ``x @ W^T`` on the inputs seen, not ``W`` itself.

    ``gram`` is the sum of ``x x^T`` over ``tokens`` input rows, so ``C = gram / tokens`` is their
    second moment, with Cholesky factor ``L`` (``C = L L^T``, ridge-regularised by ``ridge`` times
    its mean diagonal). The error ``E||x (W - M)^T||^2 = ||(W - M) L||_F^2`` is minimal for
    ``M = (W L)_r L^-1`` (truncated SVD of ``W L``): directions the inputs actually occupy get the
    rank, unused ones none. With ``W L = U S V^T``: ``A = L^-T V_r S_r^1/2``, ``B = S_r^1/2 U_r^T``.
    """
    _check_rank(rank)
    if weight.ndim != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"gram must be (in, in) = {(weight.shape[1],) * 2} for a weight of shape {tuple(weight.shape)},"
            f" got {tuple(gram.shape)}."
        )
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1 (rows summed into gram), got {tokens}.")
    device = gram.device
    second = gram.double() / tokens
    eye = torch.eye(second.shape[0], dtype=second.dtype, device=device)
    second = second + ridge * second.diagonal().mean().clamp_min(1e-12) * eye
    chol = torch.linalg.cholesky(second)
    u, s, vh = top_singular(weight.detach().to(device, torch.float64) @ chol, rank)
    root = s.sqrt()
    a = torch.linalg.solve_triangular(chol.T, vh.T, upper=True) * root
    return LowRankFactors(a.float().contiguous().cpu(), (root[:, None] * u.T).float().contiguous().cpu())


class StaleCacheError(ValueError):
    """A cached estimator was built from a different weight than the one it is asked for."""


_CACHE_FORMAT = "lightning_sft.svd_factors/1"


class SVDCache:
    """Directory of SVD factors, one safetensors file per (weight name, rank), built once.

    The file is named after the weight name and rank; its metadata holds the weight's fingerprint
    (``lightning_sft.fingerprint``). A file whose fingerprint does not match the weight (the base
    model changed, or the directory is shared between models) is refused with ``StaleCacheError``;
    pass ``rebuild_stale=True`` to overwrite it instead.
    """

    def __init__(self, directory: str | Path, *, rebuild_stale: bool = False) -> None:
        self.directory = Path(directory)
        self.rebuild_stale = rebuild_stale

    def path(self, name: str, rank: int) -> Path:
        """File of ``name`` at ``rank``: readable name plus a hash, so distinct names never collide."""
        readable = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-80:]
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        return self.directory / f"{readable}-{digest}.r{rank}.safetensors"

    def load_or_build(self, name: str, weight: Tensor, rank: int) -> LowRankFactors:
        """The factors of ``weight`` at ``rank`` (clamped to ``min(weight.shape)``), from disk if present."""
        _check_rank(rank)
        if not name:
            raise ValueError("name must be a non-empty string naming the weight (it keys the cache file).")
        rank = min(rank, min(weight.shape))
        fingerprint = fingerprint_tensors([(name, weight)])
        path = self.path(name, rank)
        if path.exists():
            factors = self._load(path, name, weight, rank, fingerprint)
            if factors is not None:
                return factors
        factors = svd_factors(weight, rank)
        metadata = {"format": _CACHE_FORMAT, "name": name, "rank": str(rank), "fingerprint": fingerprint}
        with atomic_path(path) as tmp:
            save_file({"A": factors.A, "B": factors.B}, str(tmp), metadata=metadata)
        return factors

    def _load(self, path: Path, name: str, weight: Tensor, rank: int, fingerprint: str) -> LowRankFactors | None:
        """The cached factors; None if stale and ``rebuild_stale``; raises on stale or corrupt files."""
        try:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (OSError, safetensors.SafetensorError) as error:
            raise ValueError(f"SVD cache file {path} is unreadable ({error}); delete it to rebuild.") from error
        if metadata.get("format") != _CACHE_FORMAT or set(tensors) != {"A", "B"}:
            raise ValueError(f"{path} is not an SVD cache file of format {_CACHE_FORMAT!r}; delete it to rebuild.")
        if metadata.get("fingerprint") != fingerprint:
            if self.rebuild_stale:
                return None
            raise StaleCacheError(
                f"Stale SVD estimator cache {path}: it was built for a different {name!r} weight "
                f"(stored fingerprint {metadata.get('fingerprint', '?')[:12]}..., this weight "
                f"{fingerprint[:12]}...). The base model changed or the cache directory belongs to another "
                "model: delete the file (or the directory), or use SVDCache(..., rebuild_stale=True)."
            )
        a, b = tensors["A"], tensors["B"]
        shapes_ok = a.shape == (weight.shape[1], rank) and b.shape == (rank, weight.shape[0])
        if not shapes_ok or metadata.get("rank") != str(rank):
            raise ValueError(f"SVD cache file {path} has factors of the wrong shape; delete it to rebuild.")
        return LowRankFactors(a.float(), b.float())
