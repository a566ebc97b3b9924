"""Attention maps and plots on matplotlib (Agg, no display needed).

* :func:`plot_attention_head` -- heatmap of one head's weights ``(L, S)`` with
  the query tokens down the rows and the key tokens along the columns;
* :func:`plot_attention_layer` -- a grid of every head of a layer ``(H, L, S)``;
* :func:`collect_attention_weights` -- runs one forward pass of a model and
  collects the per-head weights of every converted
  :class:`attention_ext.MultiheadAttention` inside it;
* :func:`plot_curves` -- line plot of named curves (the demo's loss curves).

matplotlib is imported only when a plotting function is called (``import
attention_ext.viz`` stays cheap), and figures are drawn on ``Figure`` objects
with the Agg canvas directly: pyplot's global state and the user's backend are
never touched. A PNG written with ``dpi`` and ``figsize=(w, h)`` is
``round(w * dpi) x round(h * dpi)`` pixels (no tight bounding box).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]

__all__ = ["plot_attention_head", "plot_attention_layer", "collect_attention_weights", "plot_curves",
           "new_figure", "save_figure"]


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------
def new_figure(figsize: Tuple[float, float], dpi: int = 100):
    """A matplotlib ``Figure`` on an Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: PathLike, dpi: Optional[int] = None) -> str:
    """Write ``fig`` as PNG to ``path`` (parent folders created); returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi or fig.dpi, format="png")
    return path


def _as_2d(weights) -> "torch.Tensor":
    w = torch.as_tensor(weights).detach()
    if w.dim() != 2:
        raise ValueError(f"expected one head's weights of shape (L, S), got shape {tuple(w.shape)}")
    return w.float().cpu()


def _draw_head(ax, w, q_tokens, k_tokens, title, vmax, fontsize, annotate):
    im = ax.imshow(w.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    L, S = w.shape
    if q_tokens is not None:
        ax.set_yticks(range(L), labels=list(q_tokens), fontsize=fontsize)
    else:
        ax.set_yticks([])
    if k_tokens is not None:
        ax.set_xticks(range(S), labels=list(k_tokens), fontsize=fontsize, rotation=90)
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    if title:
        ax.set_title(title, fontsize=fontsize + 2)
    if annotate:
        for i in range(L):
            for j in range(S):
                ax.text(j, i, f"{float(w[i, j]):.2f}", ha="center", va="center", fontsize=max(fontsize - 3, 4),
                        color="white" if w[i, j] < 0.5 * vmax else "black")
    return im


def _check_tokens(tokens, n, what):
    if tokens is not None and len(tokens) != n:
        raise ValueError(f"{what}: {len(tokens)} token labels for {n} positions")


def plot_attention_head(
    weights,
    tokens: Optional[Sequence[str]] = None,
    key_tokens: Optional[Sequence[str]] = None,
    path: Optional[PathLike] = None,
    title: Optional[str] = None,
    figsize: Tuple[float, float] = (6.0, 5.0),
    dpi: int = 100,
    annotate: bool = False,
):
    """Heatmap of one head's attention weights ``(L, S)``: row i = query token i, column j =
    key token j. ``tokens`` labels the rows (and the columns, unless ``key_tokens`` is given,
    e.g. for cross attention). Returns the path when ``path`` is given, else the ``Figure``."""
    w = _as_2d(weights)
    key_tokens = tokens if key_tokens is None else key_tokens
    _check_tokens(tokens, w.shape[0], "tokens")
    _check_tokens(key_tokens, w.shape[1], "key_tokens")
    fig = new_figure(figsize, dpi)
    ax = fig.add_subplot()
    vmax = max(float(w.max()), 1e-6)
    im = _draw_head(ax, w, tokens, key_tokens, title, vmax, 9, annotate)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    fig.colorbar(im, ax=ax, shrink=0.8)
    if path is None:
        return fig
    return save_figure(fig, path)


def plot_attention_layer(
    weights,
    tokens: Optional[Sequence[str]] = None,
    key_tokens: Optional[Sequence[str]] = None,
    path: Optional[PathLike] = None,
    title: Optional[str] = None,
    ncols: Optional[int] = None,
    panel_size: float = 3.0,
    dpi: int = 100,
    head_titles: Optional[Sequence[str]] = None,
):
    """Grid of heatmaps, one panel per head, of a layer's weights ``(H, L, S)`` (a leading batch
    dim of size 1 is dropped). Each panel is ``panel_size`` inches square (plus room for a title),
    so the figure is ``ncols * panel_size`` by ``nrows * panel_size + 0.4`` inches. Returns the
    path when ``path`` is given, else the ``Figure``."""
    w = torch.as_tensor(weights).detach().float().cpu()
    if w.dim() == 4 and w.shape[0] == 1:
        w = w[0]
    if w.dim() != 3:
        raise ValueError(f"expected a layer's weights of shape (heads, L, S), got shape {tuple(w.shape)}")
    H, L, S = w.shape
    key_tokens = tokens if key_tokens is None else key_tokens
    _check_tokens(tokens, L, "tokens")
    _check_tokens(key_tokens, S, "key_tokens")
    ncols = ncols or min(H, 4)
    nrows = math.ceil(H / ncols)
    fig = new_figure((ncols * panel_size, nrows * panel_size + 0.4), dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fontsize = 7 if max(L, S) <= 16 else 5
    for h in range(nrows * ncols):
        ax = axes[h // ncols][h % ncols]
        if h >= H:
            ax.axis("off")
            continue
        wh = w[h]
        name = head_titles[h] if head_titles is not None else f"head {h}"
        _draw_head(ax, wh, tokens if h % ncols == 0 else None, key_tokens if h // ncols == nrows - 1 or h + ncols >= H
                   else None, name, max(float(wh.max()), 1e-6), fontsize, False)
    if title:
        fig.suptitle(title)
    if path is None:
        return fig
    return save_figure(fig, path)


def plot_curves(
    curves: Mapping[str, Sequence[float]],
    path: Optional[PathLike] = None,
    x: Optional[Sequence[float]] = None,
    xlabel: str = "step",
    ylabel: str = "loss",
    title: Optional[str] = None,
    figsize: Tuple[float, float] = (7.0, 4.0),
    dpi: int = 100,
    logy: bool = False,
):
    """One line per named curve (e.g. the loss of each run). Returns the path or the ``Figure``."""
    fig = new_figure(figsize, dpi)
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    for i, (name, ys) in enumerate(curves.items()):
        ys = [float(y) for y in ys]
        xs = list(x) if x is not None else list(range(len(ys)))
        ax.plot(xs, ys, styles[i % len(styles)], label=name, linewidth=1.5)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    if path is None:
        return fig
    return save_figure(fig, path)


# ---------------------------------------------------------------------------
# collecting weights during a forward pass
# ---------------------------------------------------------------------------
def _converted_modules(model: nn.Module):
    from .nn import MultiheadAttention

    return [(name or type(model).__name__, m) for name, m in model.named_modules() if isinstance(m, MultiheadAttention)]


_FORWARD_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                 "is_causal")


def collect_attention_weights(model: nn.Module, *args, **kwargs) -> Tuple[object, Dict[str, torch.Tensor]]:
    """Run ``model(*args, **kwargs)`` once and collect the attention weights of every converted
    :class:`attention_ext.MultiheadAttention` in it (convert a model first with
    :func:`attention_ext.replace_multihead_attention`).

    Returns ``(output, weights)``: ``weights`` maps each module's name (from
    ``model.named_modules()``; ``"name#1"``, ``"name#2"``, ... when a module runs more than once)
    to its per-head weights ``(N, heads, L, S)`` (``(heads, L, S)`` for unbatched inputs),
    detached. The module's own callers see exactly what they asked for: the hooks ask each
    module for per-head weights (``need_weights=True, average_attn_weights=False``) and hand the
    caller ``None`` or the head average when that is what it requested. The hooks are removed
    afterwards (also when the forward raises); nothing else about the model changes.
    """
    modules = _converted_modules(model)
    collected: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    counts: Dict[str, int] = {}
    requested: Dict[int, list] = {}
    handles = []

    def pre_hook(mod, hargs, hkwargs):
        # bind positional arguments to names so the overrides below apply to either form
        bound = dict(zip(_FORWARD_ARGS, hargs))
        bound.update(hkwargs)
        requested.setdefault(id(mod), []).append((bound.get("need_weights", True),
                                                  bound.get("average_attn_weights", True)))
        bound["need_weights"] = True
        bound["average_attn_weights"] = False
        return (), bound

    def make_post_hook(name):
        def post_hook(mod, hargs, hkwargs, output):
            need, average = requested[id(mod)].pop()
            out, w = output
            n = counts.get(name, 0)
            counts[name] = n + 1
            collected[name if n == 0 else f"{name}#{n}"] = w.detach()
            if not need:
                return out, None
            if average:
                # heads are dim -3 for batched (N, H, L, S) and unbatched (H, L, S) weights alike
                return out, w.mean(dim=-3)
            return out, w
        return post_hook

    try:
        for name, m in modules:
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(make_post_hook(name), with_kwargs=True))
        output = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return output, dict(collected)
