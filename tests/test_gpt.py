"""The GPT model: vocabulary layout, KV cache equivalence, CogView's numerics (PB-relax, Sandwich-LN),
the Llama-style options."""

import pytest
import torch
import torch.nn.functional as F

from t2i.models.gpt import GPT, Block, CausalSelfAttention, GPTConfig, rotate

TINY = dict(n_image_codes=40, n_text_tokens=30, text_len=6, image_len=9, n_layer=2, n_head=2, n_embd=32)


def test_config_sizes_follow_the_layout():
    cfg = GPTConfig(**TINY)
    assert cfg.vocab_size == 40 + 30 + 4 and cfg.block_size == 2 + 6 + 9
    assert GPT(cfg).head.out_features == cfg.vocab_size
    pai = GPTConfig(**TINY, layout="paipainter")
    assert pai.vocab_size == 40 + 30 and pai.block_size == 6 + 9
    assert GPT(pai).head.out_features == 40  # image codes only
    with pytest.raises(ValueError, match="model.norm"):
        GPTConfig(norm="post")
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="model.layout"):
        GPTConfig(layout="cogview")
    with pytest.raises(ValueError, match="tie_head"):
        GPTConfig(**TINY, layout="paipainter", tie_head=True)


def test_base_and_large_sizes_match_pai_painter():
    # pai-painter's GPT alone: about 127M (base) and 358M (large) with a 37512-token vocabulary whose
    # head projects onto the 16384 image codes only; ours also predicts text (CogView's text loss),
    # so its head has (21128 text + 4 special) x n_embd more weights.
    for (n_layer, n_head, n_embd), pai_painter in (((12, 12, 768), 127e6), ((24, 16, 1024), 358e6)):
        with torch.device("meta"):
            model = GPT(GPTConfig(n_text_tokens=21128, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
        count = sum(p.numel() for p in model.parameters())
        expected = pai_painter + (21128 + 4) * n_embd
        assert abs(count - expected) / expected < 0.01, (n_layer, count)
        with torch.device("meta"):  # pai-painter's own layout: its exact GPT
            pai = GPT(GPTConfig(n_text_tokens=21128, n_layer=n_layer, n_head=n_head, n_embd=n_embd, norm="pre",
                                layout="paipainter"))
        assert abs(sum(p.numel() for p in pai.parameters()) - pai_painter) / pai_painter < 0.01


@pytest.mark.parametrize("norm, pb_relax", [("pre", False), ("sandwich", False), ("sandwich", True)])
def test_cached_decoding_equals_full_recomputation(norm, pb_relax):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, norm=norm, pb_relax=pb_relax)).eval()
    prompt = torch.randint(0, model.cfg.vocab_size, (3, 8))
    with torch.no_grad():
        # greedy, recomputing the whole sequence every step (EasyNLP's way)
        full = prompt
        for _ in range(model.cfg.block_size - prompt.shape[1]):
            full = torch.cat([full, model(full)[:, -1].argmax(-1, keepdim=True)], 1)
        # greedy with the KV cache: the prompt once, then one position per step
        cache = model.new_cache(3)
        logits = model(prompt, cache)
        cached = prompt
        reference = model(full[:, :-1])
        for step in range(model.cfg.block_size - prompt.shape[1]):
            assert torch.allclose(logits[:, -1], reference[:, prompt.shape[1] - 1 + step], atol=1e-5)
            token = logits[:, -1].argmax(-1, keepdim=True)
            cached = torch.cat([cached, token], 1)
            if cached.shape[1] < model.cfg.block_size:
                logits = model(token, cache)
    assert torch.equal(cached, full)


def test_pb_relax_attention_equals_plain_attention_in_fp32():
    torch.manual_seed(0)
    relaxed = CausalSelfAttention(GPTConfig(**TINY, pb_relax=True))
    q, k, v = (torch.randn(2, 2, 7, 16) for _ in range(3))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    written_out = relaxed._written_attention(q, k, v, mask)
    assert torch.allclose(written_out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    # SDPA stands in wherever it is exact: not for fp16 on a CPU
    assert not relaxed._written_out(q) and not relaxed._written_out(q.bfloat16()) and relaxed._written_out(q.half())
    assert not CausalSelfAttention(GPTConfig(**TINY))._written_out(q.half())


def test_pb_relax_keeps_fp16_attention_finite_where_plain_overflows():
    torch.manual_seed(0)
    attention = CausalSelfAttention(GPTConfig(**{**TINY, "n_embd": 64, "n_head": 1, "pb_relax": True}))
    # activations grown large, as deep in a big model: q.k reaches ~1e6, past fp16's 65504
    q, k, v = (torch.randn(1, 1, 6, 64) * 150 for _ in range(3))
    mask = torch.ones(6, 6, dtype=torch.bool).tril()

    def plain(q, k, v):  # softmax(QK^T / sqrt(d)) V, the textbook way
        scores = (q @ k.transpose(-2, -1) / 8).masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ v

    reference = plain(q.double(), k.double(), v.double())
    assert not torch.isfinite(plain(q.half(), k.half(), v.half())).all()
    relaxed = attention._written_attention(q.half(), k.half(), v.half(), mask)
    assert torch.isfinite(relaxed).all()
    assert torch.allclose(relaxed.double(), reference, atol=1e-2 * reference.abs().max().item())


def test_pb_relax_layernorm_is_unchanged_and_finite_in_fp16():
    from t2i.models.gpt import LayerNorm
    x = torch.randn(4, 32) * 3e3  # x^2 overflows fp16 inside the variance
    plain, relaxed = LayerNorm(32), LayerNorm(32, pb_relax=True)
    assert torch.allclose(plain(x), relaxed(x), atol=1e-4)
    assert torch.isfinite(relaxed.half()(x.half())).all()


def test_sandwich_ln_bounds_the_residual_stream():
    torch.manual_seed(0)
    def residual_peak(norm):
        cfg = GPTConfig(**{**TINY, "n_layer": 12, "norm": norm})
        blocks = [Block(cfg) for _ in range(cfg.n_layer)]
        x = torch.randn(2, 5, 32)
        with torch.no_grad():
            for block in blocks:
                for p in block.mlp.parameters():
                    p.mul_(8)  # branches that amplify, as training can make them
                x = block(x)
        return x.abs().max().item()
    pre, sandwich = residual_peak("pre"), residual_peak("sandwich")
    assert sandwich < 12 * 2 * 6  # each added branch is a LayerNorm output (|value| <~ sqrt(32))
    assert pre > 10 * sandwich


LLAMA_OPTIONS = [
    {"norm_type": "rms", "mlp": "swiglu", "pos": "rope2d", "bias": False},  # LlamaGen's blocks
    {"pos": "rope", "qk_norm": True},
    {"norm": "sandwich", "pb_relax": True, "norm_type": "rms", "pos": "rope2d", "qk_norm": True},
    {"mlp": "swiglu", "pos": "rope", "layout": "paipainter", "norm": "pre"},
]


@pytest.mark.parametrize("options", LLAMA_OPTIONS)
def test_llama_options_cache_and_fixed_shape_steps_equal_recomputation(options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "n_embd": 64, "n_head": 4}, **options)).eval()
    layout = model.layout
    tokens = torch.randint(0, 40, (3, model.cfg.block_size))
    if layout.predicts_text:  # a text-to-image row, an image-to-text row, and a row of neither
        tokens[0, :layout.prefix_len] = layout.prefix(torch.randint(1, 30, (1, 6)))
        tokens[1] = layout.image_to_text(torch.randint(0, 40, (1, 9)), torch.randint(1, 30, (1, 6)))
    with torch.no_grad():
        full = model(tokens)
        for step in ("forward", "forward_at"):
            cache = model.new_cache(3)
            outputs = [model(tokens[:, :5], cache)]
            for position in range(5, model.cfg.block_size):
                token = tokens[:, position:position + 1]
                if step == "forward":
                    outputs.append(model(token, cache))
                else:
                    rows = model.head.out_features
                    outputs.append(model.forward_at(token, torch.tensor([position]), cache, rows))
                    cache.length += 1
            torch.testing.assert_close(torch.cat(outputs, 1), full, atol=1e-5, rtol=1e-5)


def test_rotary_positions_rotate_by_relative_offset():
    # rope: a query-key score depends on the offset between their positions, not on where they are
    model = GPT(GPTConfig(**{**TINY, "n_embd": 64, "n_head": 4}, pos="rope"))
    head = 16
    q, k = torch.randn(1, 1, 1, head), torch.randn(1, 1, 1, head)
    caption = torch.zeros(1, dtype=torch.bool)

    def score(i: int, j: int) -> torch.Tensor:
        cos_i, sin_i = model._rotary(caption, torch.tensor([i]))
        cos_j, sin_j = model._rotary(caption, torch.tensor([j]))
        return (rotate(q, cos_i, sin_i) * rotate(k, cos_j, sin_j)).sum()

    assert torch.allclose(score(7, 3), score(12, 8), atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 5), atol=1e-3)


def test_rope2d_coordinates_put_the_image_on_its_grid():
    layout = GPTConfig(**TINY).tokens  # 3 x 3 grid after [T2I] 6 text [BOI]
    coords = layout.rotary_coordinates(caption=False, two_d=True)
    start = layout.prefix_len
    assert coords[:start].tolist() == [[i, i] for i in range(start)]
    assert coords[start:].tolist() == [[start + r, start + c] for r in range(3) for c in range(3)]
    caption = layout.rotary_coordinates(caption=True, two_d=True)
    assert caption[1:10].tolist() == [[1 + r, 1 + c] for r in range(3) for c in range(3)]
    assert caption[10:].tolist() == [[i - 9 + 3] * 2 for i in range(10, layout.block_size)]  # text after the grid
    with pytest.raises(ValueError, match="square code grid"):
        GPTConfig(**{**TINY, "image_len": 8}, pos="rope2d")
    with pytest.raises(ValueError, match="model.mlp"):
        GPTConfig(**TINY, mlp="relu")


def test_default_blocks_keep_their_state_dict_keys():
    # every earlier checkpoint and the pai-painter import name these keys
    keys = set(GPT(GPTConfig(**TINY)).state_dict())
    assert {"pos_emb", "blocks.0.mlp.0.weight", "blocks.0.mlp.2.bias", "blocks.0.ln1.bias"} <= keys
    assert not any("q_norm" in key or "rotary" in key for key in keys)
    assert "pos_emb" not in GPT(GPTConfig(**TINY, pos="rope")).state_dict()


@pytest.mark.parametrize("options", LLAMA_OPTIONS[:2])
def test_llama_options_train_with_activation_checkpointing(options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "n_embd": 64, "n_head": 4}, **options)).train()
    tokens = torch.randint(0, 40, (2, model.cfg.block_size))
    grads = []
    for recompute in (False, True):
        model.checkpoint_activations = recompute
        model.zero_grad()
        torch.manual_seed(1)
        model(tokens).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
