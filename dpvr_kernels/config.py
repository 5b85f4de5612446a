"""DPVR-LF settings, stored on the model config as ``config.dpvr`` so save/load/patch round-trips."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .flops import validate_route
from .ops.backends import check_backend_name


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
