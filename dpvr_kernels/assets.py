"""Files that ship inside the package: the demo model trained here on real handwriting, and a sample image.

``demo_model()`` is a ``LlavaForConditionalGeneration`` (CLIP tower, 8-layer Llama decoder, 3.3M parameters)
trained from random init by ``scripts/train_demo_model.py`` on 2 x 2 grids of real MNIST digits with the
question grammar of :mod:`dpvr_kernels.digit_grids`; ``demo_model(distilled=True)`` is the same model with its
DPVR-LF side branch distilled by ``dpvr-kernels distill`` at the recommended route layer (``config.dpvr``). Both
are ``save_pretrained`` folders with their processor: ``AutoProcessor`` and ``AutoModelForImageTextToText`` load
them offline, and ``dpvr_kernels.patch(model)`` restores the distilled side branch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["DEMO_MODELS", "demo_model", "resolve_model_name"]

#: Names the CLI's ``--model`` accepts for the shipped folders.
DEMO_MODELS = {"demo": "demo", "demo-dpvr": "demo-dpvr"}


def _data(name: str) -> Path:
    return Path(str(resources.files("dpvr_kernels") / "data" / name))


def demo_model(distilled: bool = False) -> str:
    """Path of the shipped demo model folder: stock, or with its distilled DPVR-LF side branch.

    Raises:
        FileNotFoundError: the folder is missing (a checkout whose model files were not installed); train it
            with ``python scripts/train_demo_model.py`` and ``python scripts/quality_study.py --ship``.
    """
    folder = _data(DEMO_MODELS["demo-dpvr" if distilled else "demo"])
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"the shipped demo model is missing at {folder}: reinstall dpvr-kernels, or train it "
                                "with `python scripts/train_demo_model.py` (stock) and "
                                "`python scripts/quality_study.py --ship` (DPVR-LF)")
    return str(folder)


def resolve_model_name(spec: str) -> str:
    """``demo`` / ``demo-dpvr`` -> the shipped folder; anything else unchanged (a folder or a Hub id)."""
    if spec in DEMO_MODELS:
        return demo_model(distilled=spec == "demo-dpvr")
    return spec
