"""Per-layer outputs under DPVR-LF: ``output_hidden_states`` and ``output_attentions`` (docs/CONTRACT.md rule 9).

Every token has one state after each layer, as in stock, and the tuples have stock's length and shapes:

* ``hidden_states``: ``N + 1`` entries ``[B, L, D]``: the decoder's input, then each layer's output. After a
  deep layer ``i`` in ``[r, N-f)`` a text position holds the text stream's state after layer ``i``, a vision
  position the side branch's output (unchanged through the deep layers: the state that is fused), a pad
  position the state at the route layer. The last entry is normed, as stock's. ``output_hidden_states`` may be
  an index or a list of indices (negative ones count from the end), as transformers' layer capture takes it:
  the other entries are ``None``.
* ``attentions`` (eager attention only, as stock needs): ``N`` entries. A full layer gives stock's weights; a
  deep layer ``[B, H, L, L]`` in a prefill, where a text query weighs text keys of its own sample only (vision
  keys get 0) and vision and pad rows are 0; in a decode step ``[B, H, q, K]`` over the deep layer's own cache,
  which holds text tokens only (so ``K`` is shorter than a full layer's). The side branch's weights are not
  reported: it is not one of the model's ``N`` layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..plan import RoutePlan

__all__ = ["WEIGHTS_KW", "LayerTrace", "start_trace", "weights_kwargs"]

#: Keyword the deep layers' attention (``attention.dpvr_varlen_attention``) takes to return its weights.
WEIGHTS_KW = "dpvr_attention_weights"


def _selection(flag, num_states: int) -> frozenset[int] | None:
    """The hidden-state indices ``output_hidden_states`` asks for (``True``: all), ``None`` for none."""
    if flag is None or flag is False:
        return None
    if flag is True:
        return frozenset(range(num_states))
    wanted = [flag] if isinstance(flag, int) else list(flag)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in wanted):
        raise TypeError(f"output_hidden_states must be a bool, an int or a list of ints; got {flag!r}")
    return frozenset(i % num_states for i in wanted if -num_states <= i < num_states)


@dataclass
class LayerTrace:
    """What one decoder call records: selected hidden states and, under eager attention, attention weights."""

    num_layers: int
    hidden: frozenset[int] | None
    attentions: bool
    states: list[Tensor | None] = field(default_factory=list)
    weights: dict[int, Tensor] = field(default_factory=dict)
    deep_text: dict[int, Tensor] = field(default_factory=dict)
    """Prefill: the packed text stream after deep layer i (key i + 1), fused into ``states`` by :meth:`fuse_deep`."""
    _hooks: list = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.hidden is not None or self.attentions

    def wants(self, index: int) -> bool:
        """Whether hidden state ``index`` (0: the input, i + 1: after layer i) is recorded."""
        return self.hidden is not None and index in self.hidden

    def record(self, index: int, hidden: Tensor) -> None:
        if self.wants(index):
            self.states[index] = hidden

    def record_deep_text(self, layer: int, text: Tensor) -> None:
        """The packed text stream ``[T, D]`` after deep layer ``layer`` of a prefill."""
        if self.wants(layer + 1):
            self.deep_text[layer + 1] = text

    def fuse_deep(self, merge, vision: Tensor, base: Tensor, plan: RoutePlan) -> None:
        """Each recorded deep layer's state ``[B, L, D]``: its text stream and the side branch's output, fused
        by ``merge`` (the route op that fuses at the last deep layer) onto ``base`` (the route layer's input)."""
        for index, text in self.deep_text.items():
            self.states[index] = merge(text, vision, base, plan)
        self.deep_text.clear()

    def watch_attention(self, layers) -> None:
        """Capture each layer's attention weights (the second output of its ``self_attn``) during the call."""
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None:
                raise NotImplementedError(
                    f"output_attentions: decoder layer {type(layer).__name__} has no self_attn to read weights from"
                )
            self._hooks.append(attn.register_forward_hook(self._capture(i)))

    def _capture(self, i: int):
        def hook(module: nn.Module, args, output) -> None:
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                self.weights[i] = output[1]

        return hook

    def scatter_deep_weights(self, layers: range, plan: RoutePlan) -> None:
        """A prefill's deep-layer weights, block-diagonal over the packed text stream ``[1, H, T, T]``, placed at
        the text tokens' positions of ``[B, H, L, L]`` (zeros elsewhere)."""
        B, L = plan.batch_size, plan.seq_len
        flat = plan.text_index
        bounds = plan.text_cu_seqlens.tolist()
        for i in layers:
            packed = self.weights.get(i)
            if packed is None:
                continue
            full = packed.new_zeros(B, packed.shape[1], L, L)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                if b > a:
                    rows = flat[a:b]
                    sample, pos = int(rows[0]) // L, rows % L
                    full[sample][:, pos[:, None], pos[None, :]] = packed[0, :, a:b, a:b]
            self.weights[i] = full

    def close(self) -> None:
        """Remove the attention hooks (also when the call fails)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def finish(self, last_hidden: Tensor) -> dict:
        """The ``hidden_states``/``attentions`` fields of the decoder's output."""
        self.close()
        out: dict = {}
        if self.hidden is not None:
            self.record(self.num_layers, last_hidden)  # the last entry is normed, as stock's
            out["hidden_states"] = tuple(self.states)
        if self.attentions:
            out["attentions"] = tuple(self.weights.get(i) for i in range(self.num_layers))
        return out


def start_trace(lm: nn.Module, kwargs: dict, user_attn: str) -> LayerTrace:
    """Pop ``output_hidden_states``/``output_attentions`` (call, else config) from ``kwargs``; a trace of them."""
    n = len(lm.layers)
    hidden_flag = kwargs.pop("output_hidden_states", None)
    attn_flag = kwargs.pop("output_attentions", None)
    hidden_flag = getattr(lm.config, "output_hidden_states", False) if hidden_flag is None else hidden_flag
    attn_flag = bool(getattr(lm.config, "output_attentions", False) if attn_flag is None else attn_flag)
    if attn_flag and user_attn != "eager":
        raise ValueError(
            f"output_attentions=True needs eager attention (this model runs {user_attn!r}, which returns no "
            "weights): load it with attn_implementation=\"eager\", or call model.set_attn_implementation(\"eager\") "
            "before dpvr_kernels.patch(model)"
        )
    trace = LayerTrace(n, _selection(hidden_flag, n + 1), attn_flag)
    if trace.hidden is not None:
        trace.states = [None] * (n + 1)
    if attn_flag:
        trace.watch_attention(lm.layers)
    return trace


def weights_kwargs(trace: LayerTrace) -> dict:
    """Keyword arguments of a deep layer's call: ask its attention for weights when the call records them."""
    return {WEIGHTS_KW: True} if trace.attentions else {}

