"""The transformer: exact 95m parameter count, tied embeddings, SubLN names, init loss, FLOPs."""

import math

import torch
import torch.nn.functional as F

from bitnet.model import PRESETS, KVCache, ModelConfig, Transformer
from bitnet.model.bitlinear import BitLinear


def test_95m_parameter_count_is_exact():
    with torch.device("meta"):
        model = Transformer(PRESETS["95m"])
    # embedding 32000*768 (tied) + 8 layers * (q 768*768 + k,v 2*768*384 + o 768*768 + 3 FFN 768*3072
    #   + input, post-attention and attn_sub norms 3*768 + ffn_sub_norm 3072) + final norm 768
    per_layer = 768 * 768 * 2 + 2 * 768 * 384 + 3 * 768 * 3072 + 3 * 768 + 3072
    expected = 32000 * 768 + 8 * per_layer + 768
    assert model.num_params() == expected == 95_398_656
    assert model.flops_per_token(1024) == 647_626_752


def test_tied_embeddings_share_one_tensor_and_all_projections_are_bitlinear():
    model = Transformer(PRESETS["tiny"])
    model.init_weights(seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names)  # the head reuses embed_tokens.weight
    bitlinears = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    assert len(bitlinears) == 7 * PRESETS["tiny"].n_layers
    for expected in ["layers.0.self_attn.attn_sub_norm.weight", "layers.0.mlp.ffn_sub_norm.weight",
                     "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight", "norm.weight"]:
        assert expected in names
    x = torch.randint(0, 32000, (1, 8))
    model(x).sum().backward()
    assert model.embed_tokens.weight.grad is not None


def test_first_loss_is_near_ln_vocab():
    for preset in ("tiny", "95m"):
        cfg = PRESETS[preset]
        model = Transformer(cfg)
        model.init_weights(seed=0)
        tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1)).item()
        assert abs(loss - math.log(cfg.vocab_size)) < 0.5, (preset, loss)


def test_init_is_seeded():
    a, b = Transformer(PRESETS["tiny"]), Transformer(PRESETS["tiny"])
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    model.init_weights(seed=0)
    x = torch.randint(0, 32000, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.empty(model.cfg, 2, 32, "cpu", torch.float32)
        first = model(x[:, :7], cache=cache)
        rest = [model(x[:, i:i + 1], cache=cache) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, rtol=1e-4, atol=1e-4)


def test_quantization_none_builds_plain_linears():
    cfg = ModelConfig(**{**PRESETS["tiny"].to_dict(), "quantization": "none"})
    model = Transformer(cfg)
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    assert model.num_params() == Transformer(PRESETS["tiny"]).num_params()
