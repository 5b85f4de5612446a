"""The GPU kit's vLLM stage: the DPVR-LF vLLM plugin on CUDA at vLLM's defaults (compiled, CUDA graphs).

On the vLLM tests' tiny DPVR-LF LLaVA (5 prompts with 0, 1 and 2 images, batched), bf16, vLLM's CUDA build:

1. the engine at its defaults resolves CUDA graphs to PIECEWISE (the deep layers' metadata builder reports no
   full-graph support) and captures graphs;
2. its greedy tokens equal the same engine's with ``enforce_eager`` (decode replays the captured ranges);
3. the eager tokens match HF DPVR-LF ``generate`` on the same GPU at least as often as stock vLLM's match stock
   HF's (the control: bf16 kernels differ, so ties may flip in both).

The attention backend (FLASH_ATTN) is tried through ``DPVR_VLLM_TRY_BACKEND``: no test has run it before this stage.

    python scripts/vllm_cuda_check.py [--out FILE.json]

Exit code: 0 passed, 1 failed, 4 not available here (no GPU, or no vLLM CUDA build in this interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_AVAILABLE = 4
NEW_TOKENS = [6, 9, 4, 7, 5]
BACKEND = "FLASH_ATTN"


def available() -> str | None:
    """Why this stage cannot run here, or None."""
    try:
        import torch
        import vllm
        from vllm.platforms import current_platform
    except Exception as e:  # noqa: BLE001 - any import failure means no usable vLLM
        return f"no vLLM in {sys.executable} ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    if not current_platform.is_cuda():
        return f"vLLM {vllm.__version__} is not a CUDA build (platform {type(current_platform).__name__})"
    return None


def hf_tokens(folder: Path, prompts, patched: bool) -> list[list[int]]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import dpvr_kernels

    proc = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    if patched:
        dpvr_kernels.patch(model)
    out = []
    for (text, imgs), n in zip(prompts, NEW_TOKENS, strict=True):
        inputs = proc(images=imgs or None, text=text, return_tensors="pt").to("cuda")
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        out.append(seq[0, inputs["input_ids"].shape[1]:].tolist())
    del model
    torch.cuda.empty_cache()
    return out


def vllm_tokens(folder: Path, prompts, **engine) -> tuple[list[list[int]], dict]:
    """Greedy tokens of one engine over all prompts at once, and what it resolved (graph mode, graphs captured)."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.compilation.counter import compilation_counter

    before = compilation_counter.num_cudagraph_captured
    llm = LLM(model=str(folder), dtype="bfloat16", max_model_len=256, max_num_seqs=3, limit_mm_per_prompt={"image": 2},
              seed=0, gpu_memory_utilization=0.3, attention_backend=BACKEND, **engine)
    config = llm.llm_engine.vllm_config.compilation_config
    reqs = [{"prompt": t, "multi_modal_data": {"image": imgs}} if imgs else {"prompt": t} for t, imgs in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True) for n in NEW_TOKENS]
    outs = llm.generate(reqs, params)
    info = {"cudagraph_mode": str(config.cudagraph_mode),
            "graphs_captured": compilation_counter.num_cudagraph_captured - before}
    del llm
    torch.cuda.empty_cache()
    return [list(o.outputs[0].token_ids) for o in outs], info


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The fraction of requests whose greedy tokens are equal."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    why = available()
    if why is not None:
        print(f"vllm_cuda_check: not run: {why}. It needs vLLM's CUDA build (vllm==0.32.0) and a GPU.")
        if args.out:
            args.out.write_text(json.dumps({"ran": False, "why": why}, indent=1) + "\n")
        return NOT_AVAILABLE

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the engine's config is readable
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["DPVR_VLLM_TRY_BACKEND"] = BACKEND
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "vllm_plugin")]
    from vllm_folders import make_dpvr_folder, make_stock_folder, prompts

    t0 = time.time()
    root = Path(tempfile.mkdtemp(prefix="dpvr_vllm_cuda_"))
    stock = make_stock_folder(root / "stock")
    dpvr = make_dpvr_folder(stock, root / "dpvr")
    items = prompts()[: len(NEW_TOKENS)]

    stock_vllm, _ = vllm_tokens(stock, items, enforce_eager=True)
    control = agreement(stock_vllm, hf_tokens(stock, items, patched=False))
    want = hf_tokens(dpvr, items, patched=True)
    eager, _ = vllm_tokens(dpvr, items, enforce_eager=True)
    graphs, info = vllm_tokens(dpvr, items)  # vLLM's defaults
    checks = {
        "piecewise CUDA graphs": info["cudagraph_mode"].split(".")[-1] == "PIECEWISE",
        "graphs captured": info["graphs_captured"] > 0,
        "graphs' tokens == eager tokens": graphs == eager,
        "eager vs HF DPVR-LF >= stock vLLM vs stock HF": agreement(eager, want) >= control,
    }
    result = {"ran": True, "backend": BACKEND, "seconds": round(time.time() - t0, 1), **info,
              "agreement_dpvr_vs_hf": agreement(eager, want), "agreement_stock_vs_hf": control,
              "checks": checks, "tokens": {"hf_dpvr": want, "eager": eager, "graphs": graphs}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| check | result |\n|---|---|")
    for name, ok in checks.items():
        print(f"| {name} | {'passed' if ok else 'FAILED'} |")
    print(f"| cudagraph mode, graphs captured | {info['cudagraph_mode']}, {info['graphs_captured']} |")
    print(f"| requests equal to HF: DPVR-LF / stock (control) | {agreement(eager, want):.0%} / {control:.0%} |")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
