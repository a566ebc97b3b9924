"""attention_ext demo: train a few steps of a small transformer whose attention
runs through attention_ext, next to the same model on PyTorch's
scaled_dot_product_attention, and show that outputs and gradients match.

    python -m attention_ext.demo [--steps N] [--device cpu|cuda]
"""
import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import attention_ext


class TinyBlock(nn.Module):
    def __init__(self, dim, heads, attn_fn):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn_fn = attn_fn

    def forward(self, x):
        b, n, d = x.shape
        # (B, N, 3, H, E) read through strides: no copies before the kernel
        qkv = self.qkv(self.n1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        a = self.attn_fn(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.n2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab, dim, heads, layers, attn_fn):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim, heads, attn_fn) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    vocab, dim, heads, layers, batch, seq = 64, 128, 4, 2, 8, 128
    ref = TinyLM(vocab, dim, heads, layers, F.scaled_dot_product_attention).to(dev)
    ours = copy.deepcopy(ref)
    for blk in ours.blocks:
        blk.attn_fn = attention_ext.attention
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=3e-3)
    print(f"attention_ext {attention_ext.__version__} | torch {torch.__version__} | device {dev}")
    print(f"{'step':>4} {'loss (torch sdpa)':>18} {'loss (attention_ext)':>21} {'max |grad diff|':>16}")
    t_ref = t_ours = 0.0
    for step in range(args.steps):
        # synthetic task: predict the token 3 positions back
        tokens = torch.randint(0, vocab, (batch, seq), device=dev)
        target = torch.roll(tokens, 3, dims=1)
        results = []
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(tokens).flatten(0, 1), target.flatten())
            loss.backward()
            grads = [p.grad.detach().clone() for p in model.parameters()]
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            results.append((loss.item(), grads, time.perf_counter() - t0))
        (l_ref, g_ref, dt_ref), (l_ours, g_ours, dt_ours) = results
        t_ref, t_ours = t_ref + dt_ref, t_ours + dt_ours
        gdiff = max((a - b).abs().max().item() for a, b in zip(g_ref, g_ours))
        if step < 5 or step % 5 == 4 or step == args.steps - 1:
            print(f"{step:>4} {l_ref:>18.5f} {l_ours:>21.5f} {gdiff:>16.2e}")
    print(f"time per step: torch sdpa {1e3 * t_ref / args.steps:.1f} ms, attention_ext {1e3 * t_ours / args.steps:.1f} ms")
    ok = abs(l_ref - l_ours) < 1e-3
    print("outputs and gradients match PyTorch" if ok else "MISMATCH between attention_ext and PyTorch")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
