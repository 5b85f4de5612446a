"""DPVR-LF on Hugging Face vision-language models, one file per concern (the semantics: ``docs/CONTRACT.md``):

- ``classes.py``: the supported model classes, one row each (which tokens are vision tokens, and when);
- ``backbone.py``: where the decoder is, how a layer is called, the patch's per-instance state;
- ``positions.py``: the position schemes (1-D RoPE, M-RoPE), split as the stock decoder uses them;
- ``forward.py``: the routed forward (route, text stream, side branch, fuse) and the multimodal wrapper's;
- ``generation.py``: ``generate``'s supported modes and the static cache's sizes;
- ``checkpoint.py``: the side branch in saved folders;
- ``patching.py``: ``patch`` / ``unpatch``, ``stock_forward`` (the distillation teacher);
- ``describe.py``: the report of what the patch did;
- ``attention.py`` (varlen attention of the streams), ``cache.py`` (the text-only deep-layer cache),
  ``distributed.py`` (the side branch under tensor parallelism and offload).
"""
