"""bitnet.generation: KV-cache parity, sampling modes, determinism, metrics, the CLI."""

import math

import pytest
import torch

from torch.overrides import TorchFunctionMode

from bitnet.cli.generate import main
from bitnet.generation import (MODES, Generation, Mode, generate, generate_batch, max_repetition, sample_metrics,
                               sample_token, stable_seed, unique_ratio)
from bitnet.instrumentation.samples import sample_rows
from bitnet.model import PRESETS, KVCache, Transformer

PROMPT = [1, 450, 2106, 310, 278]  # BOS + "The state of the"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(PRESETS["tiny"])
    m.init_weights(seed=0)
    # Sharper than the near-uniform init, so greedy and sampling paths really differ.
    with torch.no_grad():
        m.embed_tokens.weight.mul_(8.0)
    return m.eval()


def test_kv_cache_logits_match_uncached_forward(model):
    ids = torch.tensor([PROMPT + [11, 22, 33, 44, 55, 66, 77]])  # (1, 12)
    with torch.no_grad():
        full = model(ids)  # (1, 12, vocab), no cache
        cache = KVCache.empty(model.cfg, 1, ids.shape[1], "cpu", torch.float32)
        cached = [model(ids[:, :5], cache=cache)]  # prefill 5, then one token at a time
        for t in range(5, ids.shape[1]):
            cached.append(model(ids[:, t:t + 1], cache=cache))
    cached = torch.cat(cached, dim=1)
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_uncached_argmax(model):
    gen = generate(model, PROMPT, "greedy", max_new_tokens=10)
    assert len(gen.token_ids) == 10
    seq = torch.tensor([PROMPT + gen.token_ids])
    with torch.no_grad():
        logits = model(seq)[0, len(PROMPT) - 1:-1]  # the logits that chose each generated token
    assert logits.argmax(-1).tolist() == gen.token_ids
    for pos, top in enumerate(gen.top5):  # top-5 reported from the cached path agree too
        assert top["token_ids"][0] == gen.token_ids[pos]
        assert top["logits"][0] == pytest.approx(logits[pos].max().item(), abs=1e-4)


def test_modes_reproducible_and_distinct(model):
    runs = {mode: generate(model, PROMPT, mode, 16, seed=123).token_ids for mode in MODES}
    again = {mode: generate(model, PROMPT, mode, 16, seed=123).token_ids for mode in MODES}
    assert runs == again
    assert len({tuple(v) for v in runs.values()}) == 3  # greedy, typical and stress all differ
    assert generate(model, PROMPT, "stress", 16, seed=124).token_ids != runs["stress"]
    assert generate(model, PROMPT, "greedy", 16, seed=124).token_ids == runs["greedy"]  # seed unused


def test_batched_rows_match_single_generations(model):
    modes, seeds = ["greedy", "typical", "stress"], [1, 2, 3]
    rows = generate_batch(model, PROMPT, modes, seeds, 16)
    singles = [generate(model, PROMPT, m, 16, seed=s) for m, s in zip(modes, seeds)]
    assert [r.token_ids for r in rows] == [s.token_ids for s in singles]
    for r, s in zip(rows, singles):
        assert r.entropies == pytest.approx(s.entropies, abs=1e-4)
    # a row that hits EOS stops growing; the others go on
    eos = rows[1].token_ids[3]
    cut = generate_batch(model, PROMPT, modes, seeds, 16, eos_id=eos)
    assert cut[1].token_ids == rows[1].token_ids[:rows[1].token_ids.index(eos) + 1]
    assert len(cut[1].entropies) == len(cut[1].token_ids) and len(cut[1].top5) == min(10, len(cut[1].token_ids))
    assert cut[2].token_ids[:3] == rows[2].token_ids[:3]


def test_prompts_of_different_lengths_in_one_batch_match_each_alone(model):
    """Shorter prompts are padded at the start (KVCache.left_pad): each row's tokens, entropies and top-5 are
    those of its prompt generated alone, and the padding ids never matter. Not bitwise: the shifted positions
    rotate q and k by other angles (same differences in exact math), so values agree to fp32 rounding."""
    prompts = [PROMPT, [1, 99], PROMPT + [7, 8, 9, 10, 11], [1]]
    modes, seeds = ["greedy", "typical", "stress", "typical"], [7, 8, 9, 10]
    rows = generate_batch(model, prompts, modes, seeds, 12)
    for prompt, mode, seed, row in zip(prompts, modes, seeds, rows):
        alone = generate_batch(model, prompt, [mode], [seed], 12)[0]
        assert row.prompt_ids == prompt
        assert row.token_ids == alone.token_ids
        assert row.entropies == pytest.approx(alone.entropies, rel=1e-4)
        for got, want in zip(row.top5, alone.top5):
            assert got["token_ids"] == want["token_ids"]
            assert got["logits"] == pytest.approx(want["logits"], rel=1e-4, abs=1e-4)
    cache = KVCache.empty(model.cfg, 2, 8, "cpu", torch.float32, left_pad=[3, 0])
    mask = cache.attention_mask(4, "cpu")  # a 4-token prefill: row 0 starts at position 3
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0].tolist() == [[True, False, False, False], [False, True, False, False],
                                   [False, False, True, False], [False, False, False, True]]
    assert mask[1, 0].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    with pytest.raises(ValueError, match="one prompt per row"):
        generate_batch(model, [PROMPT, PROMPT], ["greedy"], [0], 4)
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(model, [PROMPT, []], ["greedy", "greedy"], [0, 1], 4)


def test_padding_ids_and_positions_never_reach_a_real_row(model):
    """Whatever the padding holds, a padded row's logits are its prompt's alone, in the prefill and in every
    decode step (one query over a longer cache each time)."""
    prompt, pad = PROMPT[:3], 4
    follow = [11, 22, 33]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        alone = model(torch.tensor([prompt + follow]))[0]  # (6, vocab), no cache
        for trial in range(2):
            junk = torch.randint(0, model.cfg.vocab_size, (pad,), generator=gen).tolist()
            cache = KVCache.empty(model.cfg, 2, pad + 6, "cpu", torch.float32, left_pad=[pad, 0])
            other = [5, 6, 7, 8] + prompt  # a row of pad + 3 real ids, no padding
            first = model(torch.tensor([junk + prompt, other]), cache=cache)  # prefill
            torch.testing.assert_close(first[0, pad:], alone[:3], atol=1e-4, rtol=1e-4)
            for t, token in enumerate(follow):  # decode: row 0 continues its prompt
                step = model(torch.tensor([[token], [token]]), cache=cache)
                torch.testing.assert_close(step[0, 0], alone[3 + t], atol=1e-4, rtol=1e-4)


def test_generate_batch_refuses_no_tokens_and_takes_tuples(model):
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        generate_batch(model, PROMPT, ["greedy"], [0], 0)
    rows = generate_batch(model, [tuple(PROMPT), tuple(PROMPT[:2])], ["greedy", "greedy"], [0, 0], 3)
    assert rows[0].token_ids == generate(model, PROMPT, "greedy", 3).token_ids
    shared = generate_batch(model, PROMPT, ["greedy", "typical"], [0, 1], 2)
    assert shared[0].prompt_ids == PROMPT and shared[0].prompt_ids is not shared[1].prompt_ids


def test_sample_batches_stay_under_the_scores_limit(model, monkeypatch):
    """BATCH_SCORES caps rows x heads x longest prompt^2 of a batch: prompts split into batches in their
    order, the rows (order, seeds, greedy tokens) as with one batch."""
    import bitnet.instrumentation.samples as samples

    prompts = ["The state of", "Science", "ab", "A longer prompt here"]
    whole = sample_rows(model, TinyTok(), prompts, step=3, seed=1, max_new_tokens=5)
    sizes, real = [], samples.generate_batch
    monkeypatch.setattr(samples, "generate_batch",
                        lambda m, ids, *a, **k: sizes.append([len(p) for p in ids]) or real(m, ids, *a, **k))
    heads = model.cfg.n_heads
    monkeypatch.setattr(samples, "BATCH_SCORES", 6 * heads * 13 ** 2)  # two prompts of up to 13 ids a batch
    split = sample_rows(model, TinyTok(), prompts, step=3, seed=1, max_new_tokens=5)
    # ids: 13, 8, 3 and 21: 13 and 8 fit (6 rows); with 3 it would be 9 rows at 13^2: a new batch; 21 alone
    assert [sorted(set(b)) for b in sizes] == [[8, 13], [3], [21]]
    assert [(r["prompt_index"], r["mode"], r["seed"]) for r in split] == [
        (r["prompt_index"], r["mode"], r["seed"]) for r in whole]
    assert [r["token_ids"] for r in split if r["mode"] == "greedy"] == [
        r["token_ids"] for r in whole if r["mode"] == "greedy"]


@pytest.mark.gpu
def test_prompts_of_different_lengths_in_one_batch_on_gpu(model):
    """The same on CUDA in bf16 autocast, where the decoding's attention runs flash/efficient/math with the
    padding mask: greedy rows equal each prompt alone."""
    gpu = Transformer(PRESETS["tiny"]).cuda()
    gpu.load_state_dict(model.state_dict())
    gpu.eval()
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    prompts = [PROMPT, [1, 99], PROMPT + [7, 8, 9, 10, 11]]
    rows = generate_batch(gpu, prompts, ["greedy"] * 3, [0, 0, 0], 12, autocast=autocast)
    for prompt, row in zip(prompts, rows):
        alone = generate_batch(gpu, prompt, ["greedy"], [0], 12, autocast=autocast)[0]
        assert row.token_ids[:4] == alone.token_ids[:4]  # bf16: later tokens may flip on near-ties
        assert row.entropies[0] == pytest.approx(alone.entropies[0], rel=2e-2)


def test_sample_rows_batch_the_prompts_with_room(model):
    """Prompts with room for max_new_tokens go in one batch; one without goes alone with what is left; the rows
    equal each prompt sampled alone (same seeds), in prompt then mode order."""
    tok = TinyTok()
    long = "x" * (model.cfg.max_seq_len - 4)  # BOS + this leaves 3 positions
    prompts = ["The state of", long, "Science"]
    rows = sample_rows(model, tok, prompts, step=20, seed=3, max_new_tokens=6)
    assert [(r["prompt_index"], r["mode"]) for r in rows] == [(i, m) for i in range(3) for m in MODES]
    assert [len(r["token_ids"]) for r in rows] == [6] * 3 + [3] * 3 + [6] * 3
    for i, prompt in enumerate(prompts):
        alone = sample_rows(model, tok, [prompt], step=20, seed=3, max_new_tokens=6)
        mine = [r for r in rows if r["prompt_index"] == i]
        if i == 0:  # the seed is per (step, prompt index, mode): alone, prompt 0 keeps its seeds
            assert [r["token_ids"] for r in mine] == [r["token_ids"] for r in alone]
        assert mine[0]["mode"] == "greedy" and mine[0]["token_ids"] == alone[0]["token_ids"]  # needs no seed
        assert [r["seed"] for r in mine] == [stable_seed("sample", 3, 20, i, m) for m in MODES]
    with pytest.raises(ValueError, match="sample prompt 1 .* fills the model's context"):
        sample_rows(model, tok, ["a", "x" * model.cfg.max_seq_len], step=1, seed=0, max_new_tokens=4)


class AttentionBackends(TorchFunctionMode):
    """Records, at every scaled_dot_product_attention call, which attention backends torch may pick."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            b = torch.backends.cuda
            self.calls.append({"key_len": args[1].shape[-2], "cudnn": b.cudnn_sdp_enabled(),
                               "flash": b.flash_sdp_enabled(), "efficient": b.mem_efficient_sdp_enabled(),
                               "math": b.math_sdp_enabled()})
        return func(*args, **(kwargs or {}))


class TinyTok:
    """The tokenizer surface sample_rows reads: ids are the characters' codes, capped to the tiny vocab."""

    vocab_size, eos_id = 256, None

    def encode(self, text, add_bos=False):
        return ([1] if add_bos else []) + [ord(c) % 256 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_sample_decoding_never_meets_cudnn_attention(model):
    """Issue 24: each decoded token is a new attention shape, and cuDNN attention (PyTorch's first pick on
    H100/H200) builds a graph per new shape: the first sample event of each process cost 14-25 s. The sample
    hook's decoding runs with cuDNN attention off and the other backends as they were, then restores it."""
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with AttentionBackends() as seen:
        rows = sample_rows(model, TinyTok(), ["The state of", "Science"], step=10, seed=0, max_new_tokens=6)
    assert len(rows) == 6 and all(len(r["token_ids"]) == 6 for r in rows)
    layers = model.cfg.n_layers
    assert len(seen.calls) == 6 * layers  # both prompts in one batch: 6 forwards (prefill, 5 decoded) x layers
    # prompts of 8 and 13 ids, padded to 13: prefill at 13, then one key more per token: a new shape each time
    assert sorted({c["key_len"] for c in seen.calls}) == list(range(13, 19))
    assert all(not c["cudnn"] and c["flash"] and c["efficient"] and c["math"] for c in seen.calls)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after the generation


def test_decode_backends_leave_cpu_generations_unchanged(model):
    """Off CUDA the restriction picks the same kernels as PyTorch's own choice: bit-identical samples."""
    modes, seeds = ["greedy", "typical", "stress"], [4, 5, 6]
    rows = generate_batch(model, PROMPT, modes, seeds, 12)
    with AttentionBackends() as seen:
        own = generate_batch(model, PROMPT, modes, seeds, 12, sdpa_backends=None)
    assert all(c["cudnn"] for c in seen.calls)  # None: PyTorch's choice, cuDNN included (the old behaviour)
    assert [r.token_ids for r in rows] == [o.token_ids for o in own]
    assert [r.entropies for r in rows] == [o.entropies for o in own]
    assert [r.top5 for r in rows] == [o.top5 for o in own]


def test_generation_leaves_global_rng_untouched(model):
    before = torch.get_rng_state()
    generate(model, PROMPT, "typical", 8, seed=5)
    generate(model, PROMPT, "stress", 8, seed=5)
    assert torch.equal(torch.get_rng_state(), before)


def test_generation_metrics_shapes(model):
    gen = generate(model, PROMPT, "stress", 14, seed=1)
    assert len(gen.entropies) == 14 and all(0 <= e <= math.log(model.cfg.vocab_size) + 1e-4 for e in gen.entropies)
    assert len(gen.top5) == 10 and all(len(t["token_ids"]) == 5 == len(t["logits"]) for t in gen.top5)
    assert all(t["logits"] == sorted(t["logits"], reverse=True) for t in gen.top5)
    assert gen.tokens_per_s > 0


def test_eos_stops_and_limits():
    m = Transformer(PRESETS["tiny"])
    m.init_weights(seed=1)
    first = generate(m, PROMPT, "greedy", 5).token_ids[0]
    assert generate(m, PROMPT, "greedy", 5, eos_id=first).token_ids == [first]
    vocab_limit = 1000
    assert all(t < vocab_limit for t in generate(m, PROMPT, "stress", 20, seed=3, vocab_limit=vocab_limit).token_ids)
    with pytest.raises(ValueError, match="context"):
        generate(m, PROMPT, "greedy", m.cfg.max_seq_len)
    with pytest.raises(ValueError, match="unknown mode"):
        generate(m, PROMPT, "beam", 4)


def test_sample_token_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_token(logits, Mode(0.0), g).item() == 0
    drawn = {sample_token(logits, Mode(1.0, top_k=2), g).item() for _ in range(200)}
    assert drawn == {0, 1}
    # softmax of [4, 3, 2, ...]: p0 = 0.64, p0 + p1 = 0.87 -> top_p 0.8 keeps exactly tokens 0 and 1
    drawn = {sample_token(logits, Mode(1.0, top_p=0.8), g).item() for _ in range(200)}
    assert drawn == {0, 1}
    drawn = {sample_token(logits, Mode(1.0, top_p=0.5), g).item() for _ in range(50)}
    assert drawn == {0}  # the most likely token is always kept


def test_repetition_and_unique_ratio():
    assert max_repetition([]) == 0
    assert max_repetition([1, 2, 3, 4]) == 1
    assert max_repetition([7, 7, 7, 7]) == 4
    assert max_repetition([1, 2, 1, 2, 1, 2, 9]) == 3
    assert max_repetition([5, 1, 2, 3, 1, 2, 3, 8]) == 2
    assert unique_ratio([1, 1, 2, 3]) == 0.75
    assert math.isnan(unique_ratio([]))
    m = sample_metrics(Generation(prompt_ids=[1], token_ids=[5, 5, 6, 7, 5], entropies=[1.0, 2.0, 3.0, 2.0, 2.0]))
    assert m == {"mean_entropy": 2.0, "max_repetition": 2, "unique_tokens": 3, "unique_ratio": 0.6}


def test_stable_seed_is_fixed_across_processes():
    # A constant: sha256-based, so any process, any PYTHONHASHSEED, any platform gives this value.
    assert stable_seed("sample", 42, 100, 0, "typical") == stable_seed("sample", 42, 100, 0, "typical")
    assert stable_seed("sample", 42, 100, 0, "typical") == 9055871450844422311
    assert stable_seed("sample", 42, 100, 0, "typical") != stable_seed("sample", 42, 100, 0, "stress")
    assert 0 <= stable_seed("x") < 2**63


def test_cli_generates_from_checkpoint(tmp_path, train_run, capsys):
    result = train_run(tmp_path / "runs", "gen", num_steps=2, no_eval=True, sample_interval=0, quant_interval=0)
    rc = main(["--checkpoint", str(result.run_dir), "--prompt", "The Union", "--max-new-tokens", "6",
               "--mode", "stress", "--seed", "3", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.startswith("The Union") and len(out) > len("The Union")
    assert "tok/s" in err and "mode stress" in err
    rc = main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x", "--device", "cpu"])
    assert rc == 2 and "error:" in capsys.readouterr().err


def test_cli_generates_from_packed_and_hf_exports(tmp_path, train_run, capsys):
    from bitnet.export import load_packed
    from bitnet.cli.export import main as export_main
    from bitnet.export.load import load_hf

    result = train_run(tmp_path / "runs", "exp", num_steps=2, no_eval=True, sample_interval=0, quant_interval=0)
    dirs = {"packed": tmp_path / "packed", "hf": tmp_path / "hf", "hf-online": tmp_path / "hf-online"}
    for flags in (["--format", "packed", "--out", str(dirs["packed"])], ["--format", "hf", "--out", str(dirs["hf"])],
                  ["--format", "hf", "--hf-weights", "online", "--out", str(dirs["hf-online"])]):
        assert export_main([str(result.run_dir), *flags, "--quiet"]) == 0
    texts = {}
    for name, d in dirs.items():
        rc = main(["--checkpoint", str(d), "--prompt", "The Union", "--max-new-tokens", "8", "--mode", "greedy",
                   "--device", "cpu"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert out.startswith("The Union") and len(out) > len("The Union") and "mode greedy" in err
        texts[name] = out
    assert texts["packed"] == texts["hf"]  # the same 2-bit tensors under two layouts
    # the loaders compute the same forward: packed and HF-packed exactly, HF-online up to bf16 rounding
    ids = torch.tensor([PROMPT])
    packed = load_packed(dirs["packed"])(ids)
    assert torch.equal(load_hf(dirs["hf"])(ids), packed)
    torch.testing.assert_close(load_hf(dirs["hf-online"])(ids), packed, atol=0.05, rtol=0.01)

    (tmp_path / "neither").mkdir()
    rc = main(["--checkpoint", str(tmp_path / "neither"), "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "neither a checkpoint" in err and err.count("\n") == 1
