"""A Hugging Face model with attn_implementation="attention_ext" against "eager", for the models whose
attention has more than SDPA's (sinks: gpt-oss, soft-capping: Gemma 2)."""
import torch

from op_counter import OpCounter


def assert_matches_eager(model, ids, attention_mask, labels):
    """Runs the model with "eager", then with "attention_ext" (the loss's backward each time). Asserts that the
    fused forward and backward ops ran (two layers or more), that the logits agree at the unpadded positions
    (a padded position's are whatever either computes) and that so do the gradients of every attention
    parameter, each non-zero. Returns those parameters' names."""
    results = {}
    for impl in ("eager", "attention_ext"):
        model.config._attn_implementation = impl
        model.zero_grad()
        with OpCounter() as c:
            out = model(ids, attention_mask=attention_mask, labels=labels)
            out.loss.backward()
        results[impl] = out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if "self_attn" in n}, c.counts
    (lo_e, g_e, _), (lo_x, g_x, counts) = results["eager"], results["attention_ext"]
    assert counts["attention_ext._attention_forward"] >= 2 and counts["attention_ext._attention_backward"] >= 2, counts
    keep = attention_mask.bool()[:, :, None].expand_as(lo_e)
    torch.testing.assert_close(lo_x[keep], lo_e[keep], rtol=1e-4, atol=1e-5)
    for n in g_e:
        scale = g_e[n].abs().max().item()
        assert scale > 0, n
        torch.testing.assert_close(g_x[n], g_e[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=n: f"{n}: {m}")
    return list(g_e)
