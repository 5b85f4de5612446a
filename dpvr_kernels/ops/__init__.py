"""Route kernels: :func:`route_split` and :func:`fuse_merge` (Triton, compiled extension, torch)."""

from .backends import BACKENDS, resolve_backend
from .fuse_merge import fuse_merge
from .route_split import route_split

__all__ = ["BACKENDS", "fuse_merge", "resolve_backend", "route_split"]
