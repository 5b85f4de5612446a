"""What every ``dpvr-kernels`` command shares: argument types, device/dtype choices, timing, logging, and
loading a user's model with its processor (``--model``) into ready inputs."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..assets import DEMO_MODELS
from ..models.classes import BY_MODEL_TYPE, SUPPORTED, vision_token_ids
from ..vision_tokens import VisionWork, image_work, tokens_per_image

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
#: Largest max relative logits error accepted by ``demo``: fp32, and half precision (same-dtype reference).
FP32_TOLERANCE = 1e-5
HALF_TOLERANCE = 2e-2

#: The LLaVA-family classes ``--model`` loads, by ``config.model_type``; ``patch()`` decides which of them
#: DPVR-LF supports and says so if one is not.
DEFAULT_PROMPT = "What is shown in this image? Answer in one sentence."


# ------------------------------------------------------------------------------------------ argument types


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, with a clear message otherwise."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def int_list(text: str) -> list[int]:
    """An argparse type: a comma-separated list of positive integers."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive integers such as 144,576,2880; got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers; got {text!r}")
    return values


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def add_common(p: argparse.ArgumentParser, size_default_help: str) -> None:
    """``--device --dtype --size --seed --threads`` and ``--model --image --prompt``."""
    from ..presets import SIZES

    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default: auto = cuda if available, else cpu; with --model a checkpoint "
                        "larger than the free GPU memory is spread over the GPUs and CPU: device_map='auto')")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="weights and activations dtype (default: auto = bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--size", choices=SIZES, default=None,
                   help="model shape, random weights: tiny (seconds; tests), cpu (scaled LLaVA-1.5: 16 layers x "
                        f"1024, 144 tokens/image), 7b (LLaVA-1.5-7B shapes; GPU). {size_default_help}")
    p.add_argument("--model", default=None, metavar="DIR_OR_HUB_ID",
                   help="your LLaVA-family checkpoint instead of --size: a folder saved with save_pretrained "
                        "(model + processor), a Hub id already in the local Hugging Face cache (nothing is "
                        "downloaded), or the shipped digit-reading model: demo (stock) or demo-dpvr (its distilled "
                        "DPVR-LF side branch)")
    p.add_argument("--image", action="append", default=None, metavar="FILE",
                   help="with --model: an image file, repeatable (default: a sample image shipped with the package)")
    p.add_argument("--prompt", default=None,
                   help=f"with --model: the question about the image(s) (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: 1 for --size tiny, whose ops are too small to split; "
                        "else torch's default capped to the idle cores, cores - load average, at least 1: "
                        "threads that wait for a busy core make every op slow and timings noisy)")


def check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--model`` excludes ``--size``; ``--image``/``--prompt`` need ``--model``."""
    if args.model is not None and args.size is not None:
        parser.error("--model and --size exclude each other: --model runs your checkpoint, --size a random-weight "
                     "model of a preset shape; drop one")
    if args.model is None and (args.image or args.prompt is not None):
        parser.error("--image and --prompt go with --model DIR (your checkpoint and its processor); the --size "
                     "models run synthetic inputs")


# -------------------------------------------------------------------------------------------- environment


def default_threads(size: str | None) -> int:
    """CPU threads for a run: 1 for ``tiny``; else torch's default, capped to the cores not busy already.

    The cap is ``cpu_count - round(load average)`` (at least 1). On a shared machine an intra-op thread that
    waits for a busy core stalls every parallel op (about a scheduler time slice each), which makes runs
    slower and the stock-vs-DPVR comparison noisy; on an idle machine this is torch's default.
    """
    if size == "tiny":
        return 1
    threads = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        idle = (os.cpu_count() or 1) - round(os.getloadavg()[0])
        threads = min(threads, max(1, idle))
    return threads


def resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device`` as a torch device; ``cuda`` without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); "
                     "use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype`` as a torch dtype (``auto``: bfloat16 on CUDA, float32 on CPU)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_size(name: str | None, device: torch.device) -> str:
    """``--size`` (default: ``7b`` on CUDA, ``cpu`` on CPU)."""
    if name is not None:
        return name
    return "7b" if device.type == "cuda" else "cpu"


def route_or_exit(parser: argparse.ArgumentParser, config: Any, route_layer: int | None,
                  fusion_layers: int) -> tuple[int, int]:
    """``(route_layer, fusion_layers)`` validated for the config's decoder; a usage error (exit 2) if not valid."""
    from ..config import validate_route

    try:
        return validate_route(config.text_config.num_hidden_layers, route_layer, fusion_layers)
    except ValueError as exc:
        parser.error(str(exc))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log(message: str) -> None:
    """A progress line on stderr (results go to stdout)."""
    print(f"[dpvr-kernels] {message}", file=sys.stderr, flush=True)


def time_alternating(run: Callable[[], Any], set_mode: Callable[[str], None], repeats: int, warmup: int,
                     device: torch.device,
                     on_run: Callable[[str], None] | None = None) -> tuple[dict[str, list[float]], Any]:
    """Time ``run`` in stock and DPVR-LF mode alternately (stock, dpvr, stock, dpvr, ...).

    Alternating makes a change in machine load (other jobs) hit both modes alike. ``set_mode("stock" |
    "dpvr")`` switches the model. Returns the timed seconds per mode (``warmup`` untimed rounds first)
    and the output of the last DPVR-LF run.
    """
    times: dict[str, list[float]] = {"stock": [], "dpvr": []}
    last = None
    for i in range(warmup + repeats):
        for mode in ("stock", "dpvr"):
            set_mode(mode)
            sync(device)
            start = time.perf_counter()
            out = run()
            sync(device)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[mode].append(elapsed)
            if mode == "dpvr":
                last = out
            del out
            if on_run is not None:
                on_run(mode)
    return times, last


def rel_err(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """Max abs difference over valid positions, relative to the reference's max abs value there."""
    valid = mask.bool()
    diff = (out.float() - ref.float())[valid].abs().max()
    return float(diff / ref.float()[valid].abs().max().clamp(min=torch.finfo(torch.float32).tiny))


def model_shape(config: Any) -> tuple[str, str]:
    """Two lines describing a model config: the decoder, and the vision tower (with its tokens per image where
    they do not depend on the image's size)."""
    t, v = config.text_config, config.vision_config
    kv = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    text = (f"{getattr(config, 'name_or_path', '') or config.model_type}: {t.model_type} decoder "
            f"{t.num_hidden_layers} layers x {t.hidden_size} ({t.num_attention_heads} heads, {kv} KV), MLP "
            f"{t.intermediate_size}, vocab {t.vocab_size}")
    name = v.model_type.removesuffix("_vision_model").removesuffix("_vision").upper()
    layers = getattr(v, "num_hidden_layers", None) or getattr(v, "depth", "?")
    width = getattr(v, "hidden_size", None) or getattr(v, "embed_dim", "?")
    try:
        per = (f"{v.image_size} px / patch {v.patch_size} -> {tokens_per_image(config)} tokens per "
               f"{'tile' if getattr(config, 'image_grid_pinpoints', None) is not None else 'image'}")
    except (AttributeError, ValueError, TypeError):  # dynamic resolution: the count depends on the image
        per = f"patch {getattr(v, 'patch_size', '?')}, tokens per image by its size"
    return text, f"{name} {layers} layers x {width}, {per}"


# ------------------------------------------------------------------------------------------ user's model


def sample_image_path() -> Path:
    """The sample PNG shipped in the package (``dpvr_kernels/data/sample.png``)."""
    return Path(str(resources.files("dpvr_kernels") / "data" / "sample.png"))


@dataclass
class UserModel:
    """A checkpoint loaded by ``--model``: the model, its processor, and where it came from."""

    model: Any
    processor: Any
    source: str
    device: torch.device
    device_map: str | None = None

    @property
    def config(self) -> Any:
        return self.model.config


@dataclass
class UserInputs:
    """The processor's output for ``--image``/``--prompt`` on the model's device, and what it holds."""

    kwargs: dict[str, Any]
    prompt_text: str
    image_files: list[str]
    image_sizes: list[tuple[int, int]]
    vision: VisionWork | None

    @property
    def input_ids(self) -> torch.Tensor:
        return self.kwargs["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.kwargs["attention_mask"]


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") != 1 or os.sep != "/" and os.sep in spec


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))


def load_user_model(parser: argparse.ArgumentParser, spec: str, dtype: torch.dtype, device: torch.device,
                    device_arg: str = "auto", attn: str = "sdpa") -> UserModel:
    """Load ``--model`` (a folder, or a Hub id in the local cache) and its processor, offline.

    Every problem the user can fix is a usage error (exit 2) that names the fix: a path that is not a
    model folder, a Hub id not in the cache, a model outside the LLaVA family, a folder without a processor.
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from ..assets import resolve_model_name

    try:
        folder = Path(os.path.expanduser(resolve_model_name(spec)))
    except FileNotFoundError as exc:
        parser.error(f"--model {spec}: {exc}")
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            parser.error(f"--model {spec}: the folder has no config.json, so it is not a model folder. Save one with "
                         f"model.save_pretrained(DIR) and processor.save_pretrained(DIR)")
        source = str(folder)
    elif folder.exists():
        parser.error(f"--model {spec}: a file, not a folder; pass the folder that save_pretrained wrote")
    elif _looks_like_path(spec):
        parser.error(f"--model {spec}: no such folder. Pass a folder saved with model.save_pretrained(DIR) and "
                     f"processor.save_pretrained(DIR), or a Hub id such as llava-hf/llava-1.5-7b-hf that is in the "
                     f"local Hugging Face cache")
    else:
        source = spec
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        parser.error(f"--model {spec}: not a local folder and not in the local Hugging Face cache "
                     f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}); "
                     f"nothing is downloaded. Fetch it first where there is network (hf download {spec}) or pass "
                     f"a folder. ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    model_type = getattr(config, "model_type", "")
    if model_type not in BY_MODEL_TYPE:
        parser.error(f"--model {spec}: model_type {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}) "
                     f"is not a LLaVA-family model. DPVR-LF patches {', '.join(SUPPORTED)}; pass one "
                     f"of those checkpoints")
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, ImportError, AttributeError) as exc:
        processor, reason = None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        if (importlib.util.find_spec("torchvision") is None
                and (isinstance(exc, (ImportError, AttributeError)) or "torchvision" in str(exc).lower())):
            # Qwen-VL, GLM-4V, InternVL, SmolVLM, Pixtral and OneVision processors cannot be built without it.
            parser.error(f"--model {spec}: its processor could not be loaded ({reason}), and torchvision is not "
                         f"installed: the processors of most classes other than LLaVA and LLaVA-NeXT need it. "
                         f"pip install torchvision (a build matching your torch), then run again")
    else:
        reason = f"found only a {type(processor).__name__}"
    if processor is None or getattr(processor, "image_processor", None) is None:
        parser.error(f"--model {spec}: no processor with an image processor in it ({reason}). The demo needs the "
                     f"tokenizer and image processor the model was trained with: save them next to the weights "
                     f"with processor.save_pretrained(DIR) (e.g. a LlavaProcessor of the tokenizer and a "
                     f"CLIPImageProcessor)")
    device_map = None
    if (device_arg == "auto" and device.type == "cuda" and folder.is_dir()
            and _weights_bytes(folder) > 0.9 * torch.cuda.mem_get_info(device)[0]):
        try:
            import accelerate  # noqa: F401
        except ImportError:
            log("model: the weights exceed the free GPU memory and accelerate is not installed; loading onto "
                f"{device} anyway (pip install accelerate to spread it with device_map='auto')")
        else:
            device_map = "auto"
    cls = getattr(transformers, BY_MODEL_TYPE[model_type].name)
    log(f"model: loading {spec} as {cls.__name__} ({dtype_name(dtype)}, "
        f"{'device_map=auto' if device_map else device})")

    def load(attn_implementation: str | dict[str, str]) -> Any:
        return cls.from_pretrained(source, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation,
                                   device_map=device_map)

    try:
        model = load(attn)
    except ValueError as exc:
        # ``attn`` is meant for the decoder (the attention DPVR-LF patches), but a string applies to every sub-model,
        # and a vision tower without that implementation (a convolutional one, e.g. FastVLM with a ConvNeXt tower)
        # refuses it: ask it of the decoder only, the tower keeps its default.
        if "does not support an attention implementation" not in str(exc):
            raise
        log(f"model: the vision tower has no {attn!r} attention; {attn!r} for the decoder only")
        model = load({"": attn, "text_config": attn})
    if device_map is None:
        model = model.to(device)
    return UserModel(model.eval(), processor, spec, device, device_map)


def _held_out_item(parser: argparse.ArgumentParser) -> Any:
    from .. import digit_grids

    try:
        return digit_grids.sample_items(1, "test", seed=0)[0]
    except ImportError as exc:
        parser.error(str(exc))


def _held_out_grid_png(parser: argparse.ArgumentParser) -> str:
    """A held-out digit grid as a PNG in a temporary folder (the default ``--image`` of ``--model demo``)."""
    import tempfile

    from PIL import Image

    from .. import digit_grids

    item = _held_out_item(parser)
    path = Path(tempfile.mkdtemp(prefix="dpvr_demo_")) / f"held_out_grid_{'_'.join(map(str, item.sources))}.png"
    Image.fromarray(digit_grids.render_grid("test", item.sources)).save(path)
    return str(path)


def _chat_text(processor: Any, n_images: int, prompt: str) -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    token = getattr(processor, "image_token", "<image>")
    log("inputs: the processor has no chat template; the prompt is the image token(s), a newline and the text")
    return token * n_images + "\n" + prompt


def processor_budget(processor: Any) -> dict[str, int]:
    """The image processor's size limits that decide how many vision tokens an image gives, as
    :func:`~dpvr_kernels.vision_tokens.image_work` keywords: the pixel bounds of the Qwen and GLM processors
    (``size["shortest_edge"]``/``["longest_edge"]`` are pixel counts there, or ``min_pixels``/``max_pixels``),
    InternVL's ``max_patches``, Idefics3/SmolVLM's and Pixtral's ``size["longest_edge"]``."""
    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None) or {}
    get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    name = type(ip).__name__
    budget: dict[str, int] = {}
    if name.startswith(("Qwen2VL", "Glm4v")):
        low = getattr(ip, "min_pixels", None) or get("shortest_edge")
        high = getattr(ip, "max_pixels", None) or get("longest_edge")
        budget.update({k: int(v) for k, v in (("min_pixels", low), ("max_pixels", high)) if v})
    elif name.startswith("GotOcr2") and getattr(ip, "max_patches", None):
        budget["max_tiles"] = int(ip.max_patches)
    elif name.startswith(("Idefics3", "SmolVLM", "Pixtral")) and get("longest_edge"):
        budget["longest_edge"] = int(get("longest_edge"))
    return budget


def user_inputs(parser: argparse.ArgumentParser, user: UserModel, images: Sequence[str] | None, prompt: str | None,
                batch: int = 1) -> UserInputs:
    """``--image``/``--prompt`` through the processor's chat template and the processor, ``batch`` copies.

    Missing or unreadable image files are usage errors. ``vision`` is the cost model's view of one sample
    (:func:`~dpvr_kernels.vision_tokens.image_work` per image), ``None`` if it does not match the tokens
    the processor inserted (then the cost model counts whole images).
    """
    from PIL import Image, UnidentifiedImageError

    files = list(images) if images else [str(sample_image_path())]
    if not images and user.source in DEMO_MODELS:  # the digit model reads digit grids: a held-out one
        files, question = [_held_out_grid_png(parser)], _held_out_item(parser).question
        prompt = prompt if prompt is not None else question
    pictures = []
    for name in files:
        try:
            with Image.open(name) as img:
                pictures.append(img.convert("RGB"))
        except FileNotFoundError:
            parser.error(f"--image {name}: no such file; pass a PNG or JPEG file (or leave --image out for the "
                         f"sample image)")
        except (UnidentifiedImageError, OSError) as exc:
            parser.error(f"--image {name}: not an image PIL can read ({exc}); pass a PNG or JPEG file")
    text = _chat_text(user.processor, len(pictures), prompt if prompt is not None else DEFAULT_PROMPT)
    # Images nested per sample: what every processor takes for a batch (SmolVLM and Idefics3 need it).
    encoded = user.processor(images=[list(pictures) for _ in range(batch)], text=[text] * batch, return_tensors="pt",
                             padding=True)
    device = user.model.device if user.device_map else user.device
    dtype = user.model.dtype
    kwargs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in encoded.items()
              if isinstance(v, torch.Tensor)}
    sizes = [(p.height, p.width) for p in pictures]
    config = user.config
    multi = len(pictures) > 1
    work = None
    budget = processor_budget(user.processor)
    try:
        work = sum((image_work(config, h, w, multi_image=multi, **budget) for h, w in sizes), VisionWork(0, 0, 0))
    except ValueError:
        work = None
    ids = kwargs["input_ids"][0]
    counted = int(sum(int((ids == i).sum()) for i in vision_token_ids(config)))
    if work is not None and work.tokens != counted:
        log(f"inputs: the processor inserted {counted} image tokens where the cost model expects {work.tokens}; "
            f"the cost model counts them as whole images")
        work = None
    return UserInputs(kwargs, text, files, sizes, work)
