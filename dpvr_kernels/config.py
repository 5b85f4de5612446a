"""DPVR-LF settings: the route layer and fusion layers, their defaults and validation, and
:class:`DPVRConfig`, stored on the model config as ``config.dpvr`` so save/load/patch round-trips."""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Any

from .ops.backends import check_backend_name

__all__ = ["DPVRConfig", "default_route_layer", "validate_route"]


def as_int(value: Any, name: str) -> int:
    """``value`` as a Python int (any integer type, not a bool or a float); ValueError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def _check_fusion(num_layers: int, fusion_layers: int) -> tuple[int, int]:
    num_layers = as_int(num_layers, "num_layers")
    fusion_layers = as_int(fusion_layers, "fusion_layers")
    if num_layers < 2:
        raise ValueError(
            f"DPVR-LF needs a decoder of at least 2 layers (one text-only layer and one fusion layer); "
            f"got num_layers={num_layers}"
        )
    if not 1 <= fusion_layers <= num_layers - 1:
        raise ValueError(
            f"fusion_layers={fusion_layers} is out of range for a {num_layers}-layer decoder: valid values "
            f"are 1 <= fusion_layers <= {num_layers - 1} (at least one fusion layer, and at least one "
            f"layer before fusion); the default is 1"
        )
    return num_layers, fusion_layers


def default_route_layer(num_layers: int, fusion_layers: int = 1) -> int:
    """Default route layer: ``round(num_layers * 18 / 32)`` clamped into ``[0, num_layers - fusion_layers - 1]``.

    This is the paper's saturation point (layer 18 of 32 for LLaVA-1.5-7B) scaled to the decoder depth.
    ``round`` is Python's (ties to even), e.g. 40 layers give 22.

    Args:
        num_layers: number of decoder layers ``N``.
        fusion_layers: number of final fusion layers ``f`` (default 1).

    Returns:
        The route layer ``r``.

    Raises:
        ValueError: if the decoder is too shallow or ``fusion_layers`` is out of range.
    """
    num_layers, fusion_layers = _check_fusion(num_layers, fusion_layers)
    return max(0, min(round(num_layers * 18 / 32), num_layers - fusion_layers - 1))


def validate_route(num_layers: int, route_layer: int | None, fusion_layers: int = 1) -> tuple[int, int]:
    """Check (and default) a route layer / fusion layer pair for an ``num_layers``-layer decoder.

    Args:
        num_layers: number of decoder layers ``N``.
        route_layer: route layer ``r``, or ``None`` for :func:`default_route_layer`.
        fusion_layers: number of final fusion layers ``f``.

    Returns:
        ``(route_layer, fusion_layers)`` as ints, with ``0 <= route_layer <= num_layers - fusion_layers - 1``.

    Raises:
        ValueError: naming the valid range and how to fix the call.
    """
    num_layers, fusion_layers = _check_fusion(num_layers, fusion_layers)
    if route_layer is None:
        return default_route_layer(num_layers, fusion_layers), fusion_layers
    route_layer = as_int(route_layer, "route_layer")
    last = num_layers - fusion_layers - 1
    if not 0 <= route_layer <= last:
        raise ValueError(
            f"route_layer={route_layer} is out of range for a {num_layers}-layer decoder with "
            f"fusion_layers={fusion_layers}: valid values are 0 <= route_layer <= {last} "
            f"(num_layers - fusion_layers - 1, so that at least one text-only layer runs before fusion). "
            f"Pick a layer in that range, lower fusion_layers, or pass route_layer=None for the default "
            f"({default_route_layer(num_layers, fusion_layers)})."
        )
    return route_layer, fusion_layers


@dataclass(frozen=True)
class DPVRConfig:
    """Where the image tokens leave (``route_layer``) and how many full layers fuse them back."""

    route_layer: int
    fusion_layers: int = 1
    backend: str = "auto"

    @classmethod
    def resolve(
        cls, num_layers: int, route_layer: int | None = None, fusion_layers: int = 1, backend: str = "auto"
    ) -> DPVRConfig:
        """Validate the settings for a decoder of ``num_layers`` layers; ``route_layer=None`` is the default."""
        check_backend_name(backend)
        route_layer, fusion_layers = validate_route(num_layers, route_layer, fusion_layers)
        return cls(route_layer=route_layer, fusion_layers=fusion_layers, backend=backend)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DPVRConfig:
        return cls(route_layer=int(d["route_layer"]), fusion_layers=int(d.get("fusion_layers", 1)),
                   backend=str(d.get("backend", "auto")))
