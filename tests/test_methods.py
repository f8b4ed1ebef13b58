"""Pure pieces of the attacks: PGD step, trigger insertion/round trip, HotFlip maths, EOT crop."""

from __future__ import annotations

from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F

from mme.protection.methods import hotflip
from mme.protection.methods.augment import random_resized_crop
from mme.protection.methods.pgd import pgd, pgd_step
from mme.protection.methods.triggers import (
    candidate_mask,
    gather_trigger,
    insert_trigger,
    protected_caption,
    token_offsets,
    trigger_text,
    word_mask,
)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.mark.parametrize("minimize", [True, False])
@pytest.mark.parametrize("eps_px", [1, 4, 8])
def test_pgd_step_projects_and_stays_on_pixel_grid(minimize, eps_px):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=g).float() / 255
    delta = torch.zeros_like(x)
    for _ in range(20):  # more steps than needed to hit the budget
        grad = torch.randn(x.shape, generator=g)
        delta = pgd_step(delta, grad, x, 1 / 255, eps_px / 255, minimize)
    px = delta * 255
    assert px.abs().max() <= eps_px + 1e-4
    assert torch.allclose(px, px.round(), atol=1e-3)  # exact int8 storage
    assert ((x + delta) >= -1e-6).all() and ((x + delta) <= 1 + 1e-6).all()


@pytest.mark.parametrize("minimize", [True, False])
def test_pgd_moves_loss_in_the_right_direction(minimize):
    x = torch.full((2, 3, 4, 4), 0.5)
    target = torch.zeros_like(x)

    def loss_fn(x_adv, step):
        return ((x_adv - target) ** 2).mean()

    delta, _ = pgd(x, torch.zeros_like(x), loss_fn, 4, 1 / 255, 8 / 255, minimize)
    expected = -4 / 255 if minimize else 4 / 255
    assert torch.allclose(delta, torch.full_like(x, expected), atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_insert_trigger_matches_tokenizer(tokenizer, k):
    mask = candidate_mask(tokenizer, tokenizer.vocab_size)
    ids = torch.nonzero(mask).flatten()[torch.arange(k) * 997 % int(mask.sum())]
    caption = "a red circle next to a small blue square"
    text = protected_caption(trigger_text(tokenizer, ids.tolist()), caption)
    expected = tokenizer([text])
    got = insert_trigger(tokenizer([caption]), ids[None], tokenizer.eot_token_id)
    assert torch.equal(got, expected)


def round_trips(tokenizer: Any, ids: list[int]) -> bool:
    """(test helper) True when the trigger's text tokenizes back to exactly ``ids``."""
    return tokenizer.encode(trigger_text(tokenizer, ids)) == list(ids)


def test_insert_trigger_truncates_like_tokenizer(tokenizer):
    caption = " ".join(["word"] * 100)  # longer than the context: EOT must survive at the end
    trig = torch.tensor([[tokenizer.encode("dog")[0]] * 3])
    got = insert_trigger(tokenizer([caption]), trig, tokenizer.eot_token_id)
    expected = tokenizer([protected_caption("dog dog dog", caption)])
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("caption", "word", "expected"),
    [
        ("a red square", 0, "T U a red square"),
        ("a red square", 1, "a T U red square"),
        ("a red square", 2, "a red T U square"),
        ("a red square", 3, "a red square T U"),
        ("a red square", 9, "a red square T U"),  # past the end: last
        ("a  red\tsquare.", 2, "a  red\tT U square."),  # the caption's own spacing is kept
    ],
)
def test_protected_caption_puts_the_trigger_before_word_p(caption, word, expected):
    assert protected_caption("T U", caption, word) == expected
    assert protected_caption("", caption, word) == caption  # no trigger: the clean caption


@pytest.mark.parametrize("word", [0, 1, 3, 5, 8])
@pytest.mark.parametrize("k", [1, 3])
def test_insert_trigger_at_a_word_matches_tokenizer(tokenizer, word, k):
    """The token rows HotFlip and PGD see are the victim tokenizer's rows of the caption file."""
    mask = candidate_mask(tokenizer, tokenizer.vocab_size)
    ids = torch.nonzero(mask).flatten()[torch.arange(k) * 997 % int(mask.sum())]
    caption = "a red circle, next to a small-ish blue square"
    text = protected_caption(trigger_text(tokenizer, ids.tolist()), caption, word)
    col = token_offsets(tokenizer, caption)[word]
    got = insert_trigger(
        tokenizer([caption]), ids[None], tokenizer.eot_token_id, torch.tensor([col])
    )
    assert torch.equal(got, tokenizer([text]))


def test_insert_trigger_per_row_positions_and_truncation(tokenizer):
    caps = ["a dog on the grass", " ".join(["word"] * 100)]
    trig = torch.tensor([tokenizer.encode("zebra lamp")] * 2)
    words = [3, 70]  # the long row: pushed past the context, truncated, EOT kept last
    cols = torch.tensor([token_offsets(tokenizer, c)[w] for c, w in zip(caps, words, strict=True)])
    got = insert_trigger(tokenizer(caps), trig, tokenizer.eot_token_id, cols)
    expected = tokenizer(
        [protected_caption("zebra lamp", c, w) for c, w in zip(caps, words, strict=True)]
    )
    assert torch.equal(got, expected)
    ones = torch.ones(2, dtype=torch.long)  # column 1 is the paper's layout, same as no pos
    default = insert_trigger(tokenizer(caps), trig, tokenizer.eot_token_id)
    assert torch.equal(insert_trigger(tokenizer(caps), trig, tokenizer.eot_token_id, ones), default)


@pytest.mark.parametrize("pos", [[1, 1, 1], [1, 4, 2], [5, 0, 3]])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("width", [None, 3])
def test_gather_trigger_takes_each_rows_own_columns(pos, k, width):
    shape = (3, 8) if width is None else (3, 8, width)
    x = torch.arange(torch.Size(shape).numel()).view(shape)
    got = gather_trigger(x, torch.tensor(pos), k)
    expected = torch.stack([x[b, p : p + k] for b, p in enumerate(pos)])
    assert torch.equal(got, expected)


def test_word_vocabulary_is_long_words_seen_in_captions(tokenizer):
    full = candidate_mask(tokenizer, tokenizer.vocab_size)
    words = word_mask(tokenizer, tokenizer.vocab_size)
    assert not (words & ~full).any() and 0 < int(words.sum()) < int(full.sum())
    ids = torch.nonzero(words).flatten()
    assert all(len(tokenizer.decode([int(i)]).strip()) >= 3 for i in ids[::500])
    seen = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    seen[tokenizer.encode("a dog runs on the green grass")] = True
    kept = {
        tokenizer.decode([int(i)]).strip()
        for i in torch.nonzero(word_mask(tokenizer, tokenizer.vocab_size, seen)).flatten()
    }
    assert kept == {"dog", "runs", "the", "green", "grass"}


def test_trigger_gradients_at_column_one_match_the_fixed_slice():
    from mme import models

    model, tok = models.create_model("mme-tiny-vit", None, torch.device("cpu"))
    tokens = tok(["zebra lamp a red square", "a picture zebra lamp of blue"])
    img = F.normalize(torch.randn(2, model.text_projection.shape[1]), dim=-1)
    loss = open_clip.ClipLoss()

    def loss_fn(i, t):
        return loss(i, t, torch.tensor(10.0))

    base = hotflip.trigger_gradients(model, tokens, img, 2, loss_fn)
    ones = hotflip.trigger_gradients(model, tokens, img, 2, loss_fn, pos=torch.tensor([1, 1]))
    assert torch.equal(base, ones)
    at = hotflip.trigger_gradients(model, tokens, img, 2, loss_fn, pos=torch.tensor([1, 3]))
    assert torch.equal(at[0], base[0]) and not torch.equal(at[1], base[1])


def test_candidates_round_trip_through_the_tokenizer(tokenizer):
    mask = candidate_mask(tokenizer, tokenizer.vocab_size)
    ids = torch.nonzero(mask).flatten()
    assert len(ids) > 20_000  # a rich vocabulary of whole words
    assert tokenizer.sot_token_id not in ids and tokenizer.eot_token_id not in ids
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        trig = ids[torch.randint(len(ids), (5,), generator=g)].tolist()
        assert round_trips(tokenizer, trig)


def test_own_loss_terms_average_to_clip_loss():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    own = hotflip.own_loss_terms(img, txt, txt[:, None], scale)[:, 0]
    ref = open_clip.ClipLoss()(img, txt, scale)
    assert torch.allclose(own.mean(), ref, atol=1e-5)


def test_own_loss_terms_of_one_changed_text():
    """A sample's term with a new text equals the batch loss rows recomputed by hand."""
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    new = F.normalize(torch.randn(5, 3, 8, generator=g), dim=-1)
    scale = torch.tensor(7.0)
    got = hotflip.own_loss_terms(img, txt, new, scale)
    for i in range(5):
        for c in range(3):
            t = txt.clone()
            t[i] = new[i, c]
            logits = scale * img @ t.T
            want = 0.5 * (
                F.cross_entropy(logits[i : i + 1], torch.tensor([i]))
                + F.cross_entropy(logits.T[i : i + 1], torch.tensor([i]))
            )
            assert torch.allclose(got[i, c], want, atol=1e-5)


def test_greedy_flip_never_increases_own_loss():
    g = torch.Generator().manual_seed(2)
    vocab = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1)

    def build(trig):  # "tokens" are the trigger ids themselves
        return trig

    def encode(tokens):  # text feature = normalised mean of the token vectors
        return F.normalize(vocab[tokens].mean(dim=1), dim=-1)

    trig = torch.randint(50, (4, 3), generator=g)
    cands = torch.randint(50, (4, 3, 6), generator=g)
    scale = torch.tensor(5.0)
    before = hotflip.own_loss_terms(img, encode(trig), encode(trig)[:, None], scale)[:, 0]
    new, after = hotflip.greedy_flip(encode, build, trig, cands, img, scale)
    assert (after <= before + 1e-6).all()
    assert (new != trig).any()


def test_top_candidates_respects_the_allowed_mask():
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(2, 3, 8, generator=g)
    emb = torch.randn(40, 8, generator=g)
    allowed = torch.zeros(40, dtype=torch.bool)
    allowed[10:20] = True
    cands = hotflip.top_candidates(grad, emb, allowed, 4)
    assert cands.shape == (2, 3, 4)
    assert ((cands >= 10) & (cands < 20)).all()
    best = (-(grad @ emb.T))[..., 10:20].argmax(-1) + 10
    assert torch.equal(cands[..., 0], best)


def test_random_resized_crop_identity_and_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16)
    same = random_resized_crop(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    y = random_resized_crop(x.requires_grad_(True), g)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _toy_text_model(seed: int, vocab: int = 30, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    table = F.normalize(torch.randn(vocab, dim, generator=g), dim=-1)

    def encode(tokens):  # text feature = normalised mean of the token vectors
        return F.normalize(table[tokens].mean(dim=1), dim=-1)

    return g, encode


def _reference_greedy(encode, trig, cands, img, scale):
    """Slow greedy pass: sample by sample, each against the texts as they are at that moment."""
    trig = trig.clone()
    for p in range(cands.shape[1]):
        txt = encode(trig)
        cur = hotflip.own_loss_terms(img, txt, txt[:, None], scale)[:, 0]
        new_trig = trig.clone()
        for i in range(len(trig)):
            best, best_tok = cur[i], trig[i, p]
            for tok in cands[i, p]:
                t = txt.clone()
                row = trig[i].clone()
                row[p] = tok
                t[i] = encode(row[None])[0]
                loss = hotflip.own_loss_terms(img, txt, t[:, None], scale)[i, 0]
                if loss < best:
                    best, best_tok = loss, tok
            new_trig[i, p] = best_tok
        trig = new_trig
    return trig


@pytest.mark.parametrize("seed", range(6))
def test_greedy_flip_compares_against_the_current_negatives(seed):
    """Regression: ``cur`` was computed once, before other samples' flips changed the negatives,
    so a later position kept or rejected candidates against a stale loss."""
    g, encode = _toy_text_model(seed)
    img = F.normalize(torch.randn(5, 6, generator=g), dim=-1)
    trig = torch.randint(30, (5, 3), generator=g)
    cands = torch.randint(30, (5, 3, 4), generator=g)
    scale = torch.tensor(20.0)
    new, own = hotflip.greedy_flip(encode, lambda t: t, trig, cands, img, scale)
    assert torch.equal(new, _reference_greedy(encode, trig, cands, img, scale))
    final = encode(new)
    assert torch.allclose(own, hotflip.own_loss_terms(img, final, final[:, None], scale)[:, 0])


@pytest.mark.parametrize(
    ("n", "batch", "sizes"),
    [(9, 4, [4, 5]), (8, 4, [4, 4]), (1, 4, [1]), (5, 4, [5]), (7, 3, [3, 4]), (6, 4, [4, 2])],
)
def test_split_batches_never_leaves_a_single_pair(n, batch, sizes):
    """Regression: ClipLoss of a batch of one is 0, so that image's noise never moved."""
    from mme.protection.methods.loop import split_batches

    got = split_batches(torch.arange(n), batch)
    assert [len(b) for b in got] == sizes
    assert torch.equal(torch.cat(got), torch.arange(n))


def test_surrogate_adamw_does_not_decay_gains_biases_or_temperature():
    """Regression: AdamW decayed every parameter; CLIP decays weight matrices only (wd 0.2)."""
    from mme import models
    from mme.config import PoisonConfig
    from mme.protection.methods.optim import decay_groups

    model, _ = models.create_model("mme-tiny-vit", None, torch.device("cpu"))
    groups = decay_groups(model, PoisonConfig().surrogate_wd)
    names = {id(p): n for n, p in model.named_parameters()}
    free = {names[id(p)] for p in groups[0]["params"]}
    decayed = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0 and groups[1]["weight_decay"] == 0.2
    assert "logit_scale" in free and "ln_final.weight" in free and "ln_final.bias" in free
    assert all(n.endswith("bias") or "ln" in n or model.get_parameter(n).ndim < 2 for n in free)
    assert "token_embedding.weight" in decayed and "text_projection" in decayed
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert free | decayed == set(names.values()) and not free & decayed


@pytest.mark.parametrize("model_name", ["mme-tiny-vit", "mme-tiny-rn"])
def test_trimmed_text_encoding_gives_the_same_features_losses_and_trigger_grads(model_name):
    """Captions cut to the longest in the batch: same features, ClipLoss, HotFlip gradients."""
    from mme import models
    from mme.protection.methods import text

    torch.manual_seed(0)
    model, tok = models.create_model(model_name, None, torch.device("cpu"))
    caps = ["a dog", "two people walk along a beach at sunset with a dog", "red ball"]
    tokens = tok(caps)
    n = text.trimmed_length(tokens)
    assert text.can_trim(model) and n == int((tokens != 0).sum(1).max()) < tokens.shape[1]
    full, trimmed = model.encode_text(tokens), text.encode_text(model, tokens)
    assert torch.allclose(full, trimmed, atol=1e-5)
    img = F.normalize(torch.randn(3, full.shape[1]), dim=-1)
    scale = torch.tensor(10.0)
    loss = open_clip.ClipLoss()
    assert torch.allclose(
        loss(img, F.normalize(full, dim=-1), scale), loss(img, F.normalize(trimmed, dim=-1), scale)
    )

    def loss_fn(i, t):
        return loss(i, t, scale)

    g_full = hotflip.trigger_gradients(model, tokens, img, 2, loss_fn)
    g_trim = hotflip.trigger_gradients(
        model, tokens, img, 2, loss_fn, lambda t: text.encode_text(model, t)
    )
    assert torch.allclose(g_full, g_trim, rtol=1e-4, atol=1e-5)


def test_trimming_falls_back_to_the_full_context_without_a_causal_mask():
    from mme import models
    from mme.protection.methods import text

    model, tok = models.create_model("mme-tiny-vit", None, torch.device("cpu"))
    model.attn_mask = None  # padding would then be visible: no trimming
    assert not text.can_trim(model)
    tokens = tok(["a dog on grass"])
    assert torch.equal(text.encode_text(model, tokens), model.encode_text(tokens))


def _tiny_store(tmp_path, n=6, size=8):
    import numpy as np

    from mme.protection.methods.store import PairStore

    clean, noise = PairStore.open_arrays(tmp_path, n, size, np.dtype(np.int8))
    rng = np.random.default_rng(0)
    clean[:] = rng.integers(0, 256, clean.shape, dtype=np.uint8)
    noise[0][:] = rng.integers(-8, 9, clean.shape, dtype=np.int8)
    return PairStore(
        clean=clean,
        noise=noise,
        current=0,
        cap_tokens=torch.zeros(n, 4, dtype=torch.long),
        cap_offsets=torch.arange(n + 1),
        triggers=torch.zeros(n, 2, dtype=torch.long),
        protect=torch.ones(n, dtype=torch.bool),
        eot_id=3,
    )


def test_store_cached_on_a_device_gives_the_same_batches_and_follows_swaps(tmp_path):
    store = _tiny_store(tmp_path)
    idx = torch.tensor([4, 0, 2])
    cpu = torch.device("cpu")
    before = store.images(idx, cpu), store.clean_batch(idx, cpu), store.noise_batch(idx, cpu)
    assert store.device_bytes() == 2 * 6 * 3 * 8 * 8
    store.cache_on(cpu)  # the GPU path, exercised on the CPU
    after = store.images(idx, cpu), store.clean_batch(idx, cpu), store.noise_batch(idx, cpu)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    store.begin_round()
    store.write_noise(idx, torch.full((3, 3, 8, 8), 2 / 255))
    store.swap()  # the cached noise must now be the new buffer
    assert torch.allclose(store.noise_batch(idx, cpu) * 255, torch.full((3, 3, 8, 8), 2.0))
    on_disk = torch.from_numpy(store.noise[store.current][[1, 5]].copy()).float()
    assert torch.allclose(store.noise_batch(torch.tensor([1, 5]), cpu) * 255, on_disk)


def test_compile_flag_wraps_the_image_tower(monkeypatch):
    """The ``compile`` path, checked without compiling (too slow for CPU tests)."""
    from mme import models
    from mme.config import PoisonConfig
    from mme.protection.methods.mem import MEM

    seen = []

    def fake_compile(fn):
        seen.append(fn)
        return lambda x: fn(x)

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, _ = models.create_model("mme-tiny-vit", None, torch.device("cpu"))
    cfg = PoisonConfig(model="mme-tiny-vit", compile=True, device="cpu")
    mem = MEM(model, None, cfg, torch.device("cpu"))  # type: ignore[arg-type]
    assert seen == [model.encode_image]
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(
        mem.encode_image(x),
        F.normalize(model.encode_image((x - mem.runtime.mean) / mem.runtime.std), dim=-1),
        atol=1e-6,
    )


def test_trigger_places_are_drawn_once_and_fit_the_context(tokenizer):
    """trigger_position random: one word per image, within every caption of it, and the trigger
    still before the end token even in a caption longer than the context."""
    from mme.config import PoisonConfig
    from mme.protection.workstore import TriggerPlaces

    caps = [
        ["a dog on the grass", "a brown dog runs across a green field"],
        [" ".join(["word"] * 100), "a cat"],  # long caption: capped by the shorter one anyway
        [" ".join(["word"] * 100)],  # only the long caption: capped by the context
    ]
    cfg = PoisonConfig(trigger_position="random", trigger_len=3, seed=5)
    runs = []
    for _ in range(2):
        places = TriggerPlaces(cfg, tokenizer, len(caps))
        for i, c in enumerate(caps):
            places.add(i, c)
        runs.append((places.words.tolist(), list(places.cols)))
    assert runs[0] == runs[1]  # from the seed alone
    words, cols = runs[0]
    assert words[0] <= 5 and words[1] <= 2
    flat = [c for group in caps for c in group]
    for col, cap, w in zip(cols, flat, [words[0]] * 2 + [words[1]] * 2 + [words[2]], strict=True):
        assert col == token_offsets(tokenizer, cap)[w] <= tokenizer.context_length - 1 - 3
