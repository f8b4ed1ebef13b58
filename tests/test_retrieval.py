"""Tests of mme.retrieval: hand-computed cases, extremes, chance levels, chunking, speed."""

from __future__ import annotations

import math
import time

import pytest
import torch

from mme.victim.retrieval import caption_index, chance_metrics, retrieval_metrics

RECALLS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def _random_counts(n: int, seed: int, hi: int = 6) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, hi + 1, (n,), generator=g).tolist()


def _reference_ranks(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor):
    """Per-query argsort ranks (the VSE++ way), 1-based; valid only without ties."""
    img = torch.nn.functional.normalize(img.double(), dim=1)
    txt = torch.nn.functional.normalize(txt.double(), dim=1)
    scores = img @ txt.T
    i2t = []
    for i in range(len(img)):
        position = torch.argsort(scores[i], descending=True).argsort()
        i2t.append(int(position[owner == i].min()) + 1)
    t2i = []
    for j in range(len(txt)):
        order = torch.argsort(scores[:, j], descending=True)
        t2i.append(int((order == owner[j]).nonzero()) + 1)
    return i2t, t2i


def test_hand_built_directions_differ() -> None:
    # Images are one-hot in D=3, so caption j's cosine with image i is component i of caption j
    # (each caption below is already unit-norm). Caption owners: [0, 0, 1, 2].
    #            img0  img1  img2
    txt = [
        [0.60, 0.80, 0.00],  # c0 -> img0
        [0.48, 0.64, 0.60],  # c1 -> img0
        [0.48, 0.60, 0.64],  # c2 -> img1
        [0.36, 0.48, 0.80],  # c3 -> img2
    ]
    img, txt, owner = torch.eye(3), torch.tensor(txt), torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(img, txt, owner)
    # i2t, rows of the table read as columns: img0 [.6 .48 .48 .36] best positive c0=.6 -> rank 1;
    # img1 [.8 .64 .6 .48] positive c2=.6 behind .8, .64 -> rank 3; img2 [0 .6 .64 .8] c3 first
    # -> rank 1. Ranks [1, 3, 1]: R@1 = 2/3, R@5 = R@10 = 1 (M = 4), medr 1, meanr 5/3.
    assert m["i2t_r1"] == pytest.approx(200 / 3)
    assert (m["i2t_r5"], m["i2t_r10"], m["i2t_medr"]) == (100.0, 100.0, 1.0)
    assert m["i2t_meanr"] == pytest.approx(5 / 3)
    # t2i, along each row: c0 own .6 behind .8 -> 2; c1 own .48 behind .64, .6 -> 3;
    # c2 own .6 behind .64 -> 2; c3 own .8 first -> 1. Ranks [2, 3, 2, 1]: R@1 = 1/4,
    # R@5 = R@10 = 1 (N = 3); 0-based ranks [1, 2, 1, 0] have median 1 -> medr 2; meanr 2.
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_r10"]) == (25.0, 100.0, 100.0)
    assert (m["t2i_medr"], m["t2i_meanr"]) == (2.0, 2.0)
    assert m["rsum"] == pytest.approx(200 / 3 + 25 + 400)
    assert (m["n_images"], m["n_captions"]) == (3, 4)
    # Chance: t2i R@1 = 1/3; i2t R@1 = mean(1 - 2/4, 1 - 3/4, 1 - 3/4) = 1/3; K >= 3 all certain.
    assert m["chance_i2t_r1"] == pytest.approx(100 / 3)
    assert m["chance_t2i_r1"] == pytest.approx(100 / 3)
    assert m["chance_rsum"] == pytest.approx(200 / 3 + 400)
    assert m["rsum_over_chance"] == pytest.approx((200 / 3 + 425) / (200 / 3 + 400))


@pytest.mark.parametrize("n, dim, seed", [(7, 4, 0), (30, 8, 1), (64, 16, 2)])
def test_matches_argsort_reference(n: int, dim: int, seed: int) -> None:
    counts = _random_counts(n, seed)
    owner = caption_index(counts)
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(n, dim, generator=g), torch.randn(len(owner), dim, generator=g)
    i2t, t2i = _reference_ranks(img, txt, owner)
    for ties in ("optimistic", "pessimistic"):  # continuous random scores: no ties, same answer
        m = retrieval_metrics(img, txt, owner, ties=ties)
        for name, ranks in (("i2t", i2t), ("t2i", t2i)):
            for k in (1, 5, 10):
                assert m[f"{name}_r{k}"] == pytest.approx(
                    100 * sum(r <= k for r in ranks) / len(ranks)
                )
            assert m[f"{name}_meanr"] == pytest.approx(sum(ranks) / len(ranks))
            sorted0 = sorted(r - 1 for r in ranks)
            median0 = (sorted0[(len(ranks) - 1) // 2] + sorted0[len(ranks) // 2]) / 2
            assert m[f"{name}_medr"] == math.floor(median0) + 1


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
@pytest.mark.parametrize("counts", [[1] * 20, [5] * 20, [1, 3, 2, 7, 1, 4] * 4])
def test_perfect_embeddings(counts: list[int], ties: str) -> None:
    owner = caption_index(counts)
    img = torch.randn(len(counts), 32, generator=torch.Generator().manual_seed(3))
    m = retrieval_metrics(img, 2.5 * img[owner], owner, ties=ties)  # scale must not matter
    assert all(m[key] == 100.0 for key in RECALLS)
    assert m["rsum"] == 600.0
    assert m["i2t_medr"] == m["t2i_medr"] == m["i2t_meanr"] == m["t2i_meanr"] == 1.0


def test_adversarial_embeddings() -> None:
    # Every caption is its image's antipode: its positive scores -1, below every other candidate.
    n, c = 20, 3
    owner = caption_index([c] * n)
    img = torch.randn(n, 32, generator=torch.Generator().manual_seed(4))
    m = retrieval_metrics(img, -img[owner], owner)
    assert all(m[key] == 0.0 for key in RECALLS)  # every K < N = 20 and K < M - c + 1 = 58
    assert m["t2i_medr"] == m["t2i_meanr"] == n
    assert m["i2t_medr"] == m["i2t_meanr"] == n * c - c + 1


def test_collapsed_embeddings_bracket_by_tie_rule() -> None:
    # All embeddings equal: every score ties. Optimistic ranks each positive first, pessimistic
    # last (behind the 40 - 2 negatives for i2t, the 19 other images for t2i).
    owner = caption_index([2] * 20)
    img, txt = torch.ones(20, 8), torch.ones(40, 8)
    optimistic = retrieval_metrics(img, txt, owner)
    pessimistic = retrieval_metrics(img, txt, owner, ties="pessimistic")
    assert all(optimistic[key] == 100.0 for key in RECALLS)
    assert all(pessimistic[key] == 0.0 for key in RECALLS)
    assert (pessimistic["i2t_medr"], pessimistic["t2i_medr"]) == (39.0, 20.0)


def test_random_embeddings_near_chance() -> None:
    n, c = 1000, 5
    owner = caption_index([c] * n)
    g = torch.Generator().manual_seed(5)
    m = retrieval_metrics(
        torch.randn(n, 64, generator=g), torch.randn(n * c, 64, generator=g), owner
    )
    for key in RECALLS:
        p = m[f"chance_{key}"] / 100
        # 5 binomial standard errors, counting only n independent images: captions of one image
        # share its (random) hubness, so they are not independent draws.
        assert abs(m[key] / 100 - p) <= 5 * math.sqrt(p * (1 - p) / n), key
    assert 0.5 < m["rsum_over_chance"] < 1.5


@pytest.mark.parametrize(
    "n, counts, expected",
    [
        # one caption each: both directions are uniform over N = 10 -> K / 10
        (10, 1, {"i2t_r1": 10, "i2t_r5": 50, "i2t_r10": 100, "t2i_r1": 10, "t2i_r10": 100}),
        # i2t R@1: mean(1 - 2/4, 1 - 3/4, 1 - 3/4) = 1/3; M = 4 <= 5 makes R@5 certain
        (3, [2, 1, 1], {"i2t_r1": 100 / 3, "i2t_r5": 100, "t2i_r1": 100 / 3, "t2i_r5": 100}),
        # i2t R@5, M = 6: image 0 has 5 positives and 1 negative -> certain; image 1 misses only
        # when its caption is last: 1 - 1/6. Mean (1 + 5/6) / 2 = 11/12.
        (2, [5, 1], {"i2t_r5": 1100 / 12, "i2t_r1": (5 / 6 + 1 / 6) / 2 * 100, "t2i_r1": 50}),
        # 5 captions each of 1000: i2t R@1 = 5 / 5000
        (1000, 5, {"i2t_r1": 0.1, "t2i_r1": 0.1, "t2i_r10": 1.0}),
    ],
)
def test_chance_closed_form(n: int, counts: int | list[int], expected: dict[str, float]) -> None:
    chance = chance_metrics(n, counts)
    for key, value in expected.items():
        assert chance[f"chance_{key}"] == pytest.approx(value)
    assert chance["chance_rsum"] == pytest.approx(
        sum(v for k, v in chance.items() if k != "chance_rsum")
    )


def test_chance_matches_monte_carlo() -> None:
    n, trials = 30, 4000
    counts = _random_counts(n, seed=6)
    owner = caption_index(counts)
    g = torch.Generator().manual_seed(7)
    # Random rankings: the position of every caption (i2t) and of every image (t2i) in each trial.
    caption_pos = torch.rand(trials, len(owner), generator=g).argsort(1).argsort(1)
    best = torch.full((trials, n), len(owner)).scatter_reduce(
        1, owner.expand(trials, -1), caption_pos, "amin"
    )
    image_pos = torch.rand(trials, n, generator=g).argsort(1).argsort(1)[:, 0]
    chance = chance_metrics(n, counts)
    for k in (1, 5, 10):
        for key, hits in ((f"i2t_r{k}", best < k), (f"t2i_r{k}", image_pos < k)):
            p = chance[f"chance_{key}"] / 100
            # trials are independent; images within one trial only make the estimate tighter
            assert abs(hits.double().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / trials), key


def test_chunking_invariance() -> None:
    counts = _random_counts(37, seed=8)
    owner = caption_index(counts)
    g = torch.Generator().manual_seed(9)
    img, txt = torch.randn(37, 8, generator=g), torch.randn(len(owner), 8, generator=g)
    for ties in ("optimistic", "pessimistic"):
        results = [retrieval_metrics(img, txt, owner, chunk=c, ties=ties) for c in (1, 7, 10_000)]
        assert results[0] == results[1] == results[2]


def test_caption_index() -> None:
    assert caption_index([2, 1, 3]).tolist() == [0, 0, 1, 2, 2, 2]
    assert caption_index(torch.tensor([1, 1])).dtype == torch.long


@pytest.mark.parametrize("counts", [[], [2, 0, 1], [1.5, 2.0], [[1, 2]]])
def test_bad_caption_counts(counts: list) -> None:
    with pytest.raises(ValueError):
        caption_index(counts)


def test_chance_count_mismatch() -> None:
    with pytest.raises(ValueError, match="3 caption counts given for 4 images"):
        chance_metrics(4, [1, 2, 3])


def _bad_inputs() -> list:
    img, txt, owner = torch.randn(3, 4), torch.randn(4, 4), torch.tensor([0, 0, 1, 2])
    nan = txt.clone()
    nan[1, 2] = float("nan")
    return [
        pytest.param(img, txt[:, :3], owner, {}, "embeddings", id="dim-mismatch"),
        pytest.param(img, txt, owner[:3], {}, "text_to_image", id="owner-length"),
        pytest.param(img, txt, owner.float(), {}, "integer", id="owner-float"),
        pytest.param(img, txt, torch.tensor([0, 0, 1, 3]), {}, "lie in", id="owner-range"),
        pytest.param(img, txt, torch.tensor([0, 0, 1, 1]), {}, "no caption", id="uncaptioned"),
        pytest.param(img, nan, owner, {}, "NaN", id="nan"),
        pytest.param(img, txt, owner, {"chunk": 0}, "chunk", id="chunk-0"),
        pytest.param(img, txt, owner, {"ties": "random"}, "ties", id="ties"),
    ]


@pytest.mark.parametrize("img, txt, owner, kwargs, match", _bad_inputs())
def test_bad_inputs(img, txt, owner, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(img, txt, owner, **kwargs)


def test_mscoco_5k_size_is_fast() -> None:
    # MSCOCO 5K test split: 5000 images x 25000 captions, CLIP's D = 512. ~2-3 s on 2 CPU cores.
    g = torch.Generator().manual_seed(10)
    img, txt = torch.randn(5000, 512, generator=g), torch.randn(25000, 512, generator=g)
    owner = caption_index([5] * 5000)
    start = time.perf_counter()
    m = retrieval_metrics(img, txt, owner)
    assert time.perf_counter() - start < 20
    assert (m["n_images"], m["n_captions"]) == (5000, 25000)
