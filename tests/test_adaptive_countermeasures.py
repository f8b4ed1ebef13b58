"""Adaptive countermeasures of ``mme attack`` (issue 18): the trigger detectors that use the
published files only, ``oracle-strip`` (needs the private files) and the private score.

Pure functions first, then sets built here with the poison's own caption layout
(``protected_caption``), then a tiny real ``mme poison`` run (start and random positions)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from mme import cli, limits, shards
from mme.config import AttackConfig, ConfigError, load_section
from mme.countermeasures import detect, oracle, score, transforms
from mme.countermeasures.apply import attack
from mme.protection.methods.triggers import protected_caption

TRIGGER = "zorp quix blen"


# -- pure functions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption",
    ["a dog runs on the grass .", "one", "two words", "a  double  spaced caption", "x y"],
)
@pytest.mark.parametrize("trigger", ["zorp", "zorp quix blen"])
def test_drop_window_inverts_protected_caption(caption: str, trigger: str) -> None:
    k = len(trigger.split())
    for word in range(len(caption.split()) + 1):
        protected = protected_caption(trigger, caption, word)
        assert protected.split()[word : word + k] == trigger.split()
        assert detect.drop_window(protected, (word, k)) == caption


@pytest.mark.parametrize("window", [None, (3, 2), (-1, 1), (0, 0), (4, 1)])
def test_drop_window_that_does_not_fit_keeps_the_caption(window) -> None:
    assert detect.drop_window("a b c d", window) == "a b c d"


def corpus_of(*images: list[str]) -> detect.Corpus:
    return detect.fit(images)


CLEAN = [
    ["a dog runs on the grass", "a brown dog is running", "the dog plays outside in a park"],
    ["two children sit on a bench", "kids resting on a wooden bench", "two kids on a bench"],
    ["a man rides a red bike", "a cyclist on a road", "a person riding a bicycle downhill"],
]


TRIGGERS = ["zorp quix blen", "fluv dax morn", "quib tesh vorl"]  # one per image, as MEM's


def protect(images: list[list[str]], words: list[int]) -> list[list[str]]:
    rows = zip(images, words, TRIGGERS, strict=True)
    return [[protected_caption(t, c, w) for c in caps] for caps, w, t in rows]


@pytest.mark.parametrize("words", [[0, 0, 0], [2, 1, 4], [5, 4, 4]])
def test_detect_trigger_finds_the_window_and_restores_the_captions(words: list[int]) -> None:
    images = protect(CLEAN, words)
    corpus = corpus_of(*images)
    for caps, clean, w in zip(images, CLEAN, words, strict=True):
        assert detect.consistent_window(caps, 3, corpus) == w
        assert detect.apply(caps, detect.window_of_image(caps, 3, corpus)) == clean


def test_detect_trigger_rarity_breaks_ties_and_keeps_natural_images() -> None:
    """ "a dog" starts every caption too; the rare trigger wins. A clean image, or one with a
    single caption, has no window to drop."""
    caps = [f"a dog {TRIGGER} {rest}" for rest in ("runs", "sits down", "is wet today")]
    corpus = corpus_of(caps, *CLEAN, ["a dog barks", "a dog sleeps"])
    assert detect.consistent_window(caps, 2, corpus) == 2  # not "a dog" at 0
    assert detect.window_of_image(CLEAN[0], 3, corpus) == [None] * 3
    assert detect.window_of_image([f"{TRIGGER} a cat"], 3, corpus) == [None]


def test_detect_trigger_allows_a_majority_when_a_caption_is_too_short() -> None:
    caps = [f"a b c d e {TRIGGER} f", f"g h i j k {TRIGGER}", f"l m n o p {TRIGGER} q", "short"]
    corpus = corpus_of(caps)
    assert detect.window_of_image(caps, 3, corpus) == [(5, 3)] * 3 + [None]
    assert detect.consistent_window(caps[2:], 3, corpus) is None  # 1 of 2 is no majority


def test_detect_ngram_finds_triggers_at_different_places() -> None:
    """Per caption: a trigger at another word in each caption is still found, from a bigram
    model of the other images' captions (the image's own repeats do not make it likely)."""
    rng = np.random.default_rng(0)
    rows = [
        (["dog", "cat", "man"], ["runs", "sits", "walks"], ["grass", "bench", "road"]),
        (["boy", "girl", "dog"], ["plays", "jumps", "runs"], ["beach", "street", "grass"]),
        (["man", "cat", "boy"], ["sits", "walks", "jumps"], ["road", "grass", "bench"]),
    ]
    others = [[f"a {a} {v} on the {p}" for a, v, p in zip(*row, strict=True)] for row in rows]
    image = ["a dog runs on the grass", "a cat sits on the bench", "a man walks on the road"]
    words = [int(rng.integers(0, 6)) for _ in image]
    caps = [protected_caption(TRIGGER, c, w) for c, w in zip(image, words, strict=True)]
    corpus = corpus_of(caps, *others)
    assert detect.ngram_windows(caps, 3, corpus) == [(w, 3) for w in words]
    assert detect.apply(caps, detect.ngram_windows(caps, 3, corpus)) == image
    assert detect.ngram_windows(["zorp quix blen"], 3, corpus) == [None]  # nothing would be left


def test_detect_ngram_refits_away_from_triggers_that_reuse_words() -> None:
    """Triggers drawn from a few words at the start of every caption (as MEM's reuse words
    across images) look like a common phrase to a model fitted on the poisoned split itself;
    refitting on the captions without the windows found so far finds most of them."""
    rng = random.Random(0)
    words = ["zorp", "quix", "blen", "fluv", "dax", "morn"]
    nouns, verbs = ["dog", "cat", "man", "boy", "girl", "woman", "horse", "bird"], [
        "runs", "sits", "walks", "jumps", "plays", "rests", "stands", "waits"]  # fmt: skip
    places = ["grass", "bench", "road", "beach", "street", "snow", "water", "field"]
    images = []
    for _ in range(60):
        trigger = " ".join(rng.sample(words, 3))
        caps = [
            f"a {rng.choice(nouns)} {rng.choice(verbs)} on the {rng.choice(places)}"
            for _ in range(3)
        ]
        images.append([protected_caption(trigger, c, 0) for c in caps])
    found = {}
    for fits in (1, 4):
        det = detect.NgramDetector(3, lambda: iter(images), fits)
        found[fits] = sum(det.windows(caps) == [(0, 3)] * 3 for caps in images)
    assert found[1] < 30 < 50 < found[4]
    assert detect.NGRAM_FITS == 4


def test_corpus_counts_are_capped(monkeypatch) -> None:
    monkeypatch.setattr(limits, "MAX_CORPUS_BIGRAMS", 5)
    with pytest.raises(ValueError, match="MAX_CORPUS_BIGRAMS"):
        detect.fit([["a b c d e f g"]])
    monkeypatch.setattr(limits, "MAX_CORPUS_WORDS", 4)
    with pytest.raises(ValueError, match="MAX_CORPUS_WORDS"):
        detect.fit([["a b c"]])


@pytest.mark.parametrize(
    ("manifest", "k"),
    [({"trigger_len": 5}, 5), ({"trigger_len": 0}, 3), ({}, 3), ({"trigger_len": True}, 3)],
)
def test_public_k(manifest: dict, k: int) -> None:
    assert detect.public_k(manifest) == k


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("detect-trigger", "detect-trigger"),
        ("detect-trigger:5", "detect-trigger:5"),
        ("detect-ngram:2", "detect-ngram:2"),
        ("oracle-strip", "oracle-strip"),
    ],
)
def test_parse_countermeasure_specs(spec: str, text: str) -> None:
    parsed = transforms.parse_spec(spec)
    assert str(parsed) == text and parsed.on_text
    assert transforms.attack_image(parsed, np.zeros((4, 4, 3), np.uint8)) is None
    with pytest.raises(ValueError, match="needs the whole split"):
        transforms.attack_captions(parsed, ["a b"], "k", 0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("detect-trigger:0", "outside"),
        ("detect-ngram:17", "outside"),
        ("detect-trigger:2.5", "whole number"),
        ("oracle-strip:3", "takes no argument"),
        ("detect-trigger:x", "unknown attack"),
        ("detect", "unknown attack"),
    ],
)
def test_bad_countermeasure_specs_give_one_line_errors(spec: str, message: str, capsys) -> None:
    with pytest.raises(ValueError, match=message):
        transforms.parse_spec(spec)
    assert cli.main(["attack", "--params", "none", "--transform", spec]) == 2
    err = capsys.readouterr().err
    assert "attack.transform" in err and len(err.strip().splitlines()) == 1


def test_oracle_strip_and_score_out_need_a_private_folder(capsys) -> None:
    with pytest.raises(ConfigError, match="oracle-strip needs the private files"):
        load_section("attack", None, {"transform": "oracle-strip"})
    with pytest.raises(ConfigError, match="score_out needs score_private"):
        load_section("attack", None, {"score_out": "s.json"})
    assert cli.main(["attack", "--params", "none", "--transform", "oracle-strip"]) == 2
    err = capsys.readouterr().err
    assert "--private DIR" in err and len(err.strip().splitlines()) == 1


# -- sets built here ----------------------------------------------------------------------------


def write_set(folder: Path, images: list[list[str]], trigger_len: int = 3) -> Path:
    px = shards.encode_png(np.full((8, 8, 3), 100, np.uint8))
    samples = [
        shards.Sample(f"im-{i}", px, "png", caps, {"id": f"im-{i}", "method": "mem"})
        for i, caps in enumerate(images)
    ]
    records = shards.write_shards(folder, "train", samples, maxcount=2)
    manifest = {"method": "mem", "epsilon": 8.0, "trigger_len": trigger_len}
    manifest["splits"] = {"train": {"images": len(images), "shards": records}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def write_private(folder: Path, triggers: list[str], words: list[int] | None) -> Path:
    folder.mkdir(parents=True)
    rows = {"ids": [f"im-{i}" for i in range(len(triggers))], "trigger_text": triggers}
    rows["protected"] = [bool(t) for t in triggers]
    if words is not None:
        rows["trigger_word"] = words
    (folder / "triggers.json").write_text(json.dumps(rows))
    return folder


POSITIONS = {"start": None, "random": [2, 1, 4]}


@pytest.fixture(params=list(POSITIONS))
def poisoned(request, tmp_path: Path) -> tuple[Path, Path]:
    """CLEAN with a different trigger per image, at the start or at a word of each image."""
    words = POSITIONS[request.param]
    images = protect(CLEAN, words or [0, 0, 0])
    return write_set(tmp_path / "prot", images), write_private(tmp_path / "priv", TRIGGERS, words)


def run_attack(prot: Path, out: Path, spec: str, *extra: str) -> int:
    argv = ["attack", "--params", "none", "--transform", spec, "--protected", str(prot)]
    return cli.main([*argv, "--out", str(out), *extra])


def captions_of(folder: Path) -> list[list[str]]:
    return [s.captions for s in shards.iter_samples(folder, "train")]


@pytest.mark.parametrize("spec", ["detect-trigger", "oracle-strip"])  # n-gram: too few captions
def test_countermeasures_give_back_the_clean_captions(poisoned, tmp_path: Path, spec) -> None:
    prot, priv = poisoned
    out = tmp_path / "out"
    assert run_attack(prot, out, spec, "--private", str(priv)) == 0
    assert captions_of(out) == CLEAN
    manifest = shards.load_manifest(out)
    assert manifest["attack"] == (spec if spec == "oracle-strip" else f"{spec}:3")
    assert not {"private", "score_private", "score_out"} & set(manifest["config"])
    for a, b in zip(shards.iter_samples(prot, "train"), shards.iter_samples(out, "train")):  # noqa: B905
        assert a.image_bytes == b.image_bytes  # text countermeasures leave the pixels alone


def test_detectors_read_the_published_files_only(poisoned, tmp_path: Path) -> None:
    """The same bytes with the private folder present, scored against, or gone (and K from the
    public manifest): nothing the detectors write depends on it."""
    prot, priv = poisoned
    out = tmp_path / "out"
    for spec in ("detect-trigger", "detect-ngram"):
        score_out = tmp_path / f"{spec}.json"
        flags = ["--score-private", str(priv), "--score-out", str(score_out)]
        assert run_attack(prot, out, spec, *flags) == 0
        scored = {p.name: p.read_bytes() for p in out.iterdir()}
        moved = shutil.move(priv, tmp_path / "elsewhere")
        assert run_attack(prot, out, spec, "--private", str(priv)) == 0  # absent: never opened
        shutil.move(moved, priv)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == scored
        assert json.loads(score_out.read_text())["captions"] == 9
    assert run_attack(prot, tmp_path / "o", "oracle-strip", "--private", str(tmp_path / "no")) == 2
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_detectors_import_nothing_that_could_read_a_private_folder() -> None:
    """detect.py gets captions and k only: no file, shard, oracle or score module in reach."""
    import ast

    tree = ast.parse(Path(detect.__file__).read_text())
    imported = {
        n.name for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names
    }
    imported |= {
        f"{node.module}.{n.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for n in node.names
    }
    allowed = {"__future__.annotations", "math", "re", "collections.Counter", "mme.limits"}
    allowed |= {"collections.abc.Iterable", "collections.abc.Callable", "array.array"}
    allowed |= {"dataclasses.dataclass", "dataclasses.field"}
    assert imported <= allowed, imported - allowed


def test_score_numbers_on_a_tiny_set(tmp_path: Path, capsys) -> None:
    """Image 0: trigger at word 2, found. Image 1: not protected, but its captions share "two
    kids on" at word 0 (a false positive of 3 words x 3 captions). Image 2: trigger at word 4;
    strip-trigger:3 misses it while detect-trigger finds it."""
    images = [
        [protected_caption(TRIGGER, c, 2) for c in CLEAN[0]],
        ["two kids on a bench", "two kids on the grass", "two kids on wooden seats"],
        [protected_caption("fluv dax morn", c, 4) for c in CLEAN[2]],
    ]
    prot = write_set(tmp_path / "prot", images)
    priv = write_private(tmp_path / "priv", [TRIGGER, "", "fluv dax morn"], [2, 0, 4])
    out_json = tmp_path / "score.json"
    flags = ["--score-private", str(priv), "--score-out", str(out_json)]
    assert run_attack(prot, tmp_path / "d", "detect-trigger", *flags) == 0
    got = json.loads(out_json.read_text())
    assert got["attack"] == "detect-trigger:3" and got["private"] == str(priv)
    assert (got["images"], got["images_protected"], got["images_exact"]) == (3, 2, 2)
    assert got["unprotected_untouched"] == 0 and got["images_unlisted"] == 0
    assert (got["words_removed"], got["words_trigger"], got["words_hit"]) == (27, 18, 18)
    assert got["precision"] == pytest.approx(18 / 27) and got["recall"] == 1.0
    assert (got["captions"], got["captions_exact"]) == (9, 6)
    assert "precision 0.6667, recall 1.0000" in capsys.readouterr().err
    assert run_attack(prot, tmp_path / "s", "strip-trigger:3", *flags) == 0
    got = json.loads(out_json.read_text())  # image 0: words 0-2 removed, trigger at 2-4: 1 hit
    assert (got["words_removed"], got["words_hit"], got["images_exact"]) == (27, 3, 0)
    assert got["captions_exact"] == 0
    assert run_attack(prot, tmp_path / "o", "oracle-strip", "--private", str(priv), *flags) == 0
    got = json.loads(out_json.read_text())
    assert (got["precision"], got["recall"], got["captions_exact"]) == (1.0, 1.0, 9)
    assert got["unprotected_untouched"] == 1


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("not json", "unreadable"),
        ({"ids": "x"}, "no list of ids"),
        ({"ids": ["a/../b"], "trigger_text": ["x"]}, "bad or repeated id"),
        ({"ids": ["a", "a"], "trigger_text": ["x", "y"]}, "bad or repeated id"),
        ({"ids": ["a"], "trigger_text": ["x", "y"]}, "differ in length"),
        ({"ids": ["a"], "trigger_text": ["x"], "trigger_word": [-1]}, "whole number"),
        ({"ids": ["a"], "trigger_text": [" ".join(["w"] * 17)]}, "over 16 words"),
    ],
)
def test_hostile_triggers_json_is_refused(tmp_path: Path, rows, message: str) -> None:
    (tmp_path / "triggers.json").write_text(rows if isinstance(rows, str) else json.dumps(rows))
    with pytest.raises(ConfigError, match=message):
        oracle.TriggerTable.load(tmp_path)


def test_triggers_json_link_and_wrong_folder_are_refused(poisoned, tmp_path: Path) -> None:
    prot, priv = poisoned
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "triggers.json").symlink_to(priv / "triggers.json")
    with pytest.raises(ConfigError, match="symlink"):
        oracle.TriggerTable.load(linked)
    other = write_private(tmp_path / "other", ["aa bb cc"] * 3, None)
    with pytest.raises(ConfigError, match="does not belong to the protected set"):
        cfg = AttackConfig(transform="oracle-strip", private=other)
        attack(cfg.model_copy(update={"protected": prot, "out": tmp_path / "o"}))
    with pytest.raises(ConfigError, match="inside"):
        attack(AttackConfig(transform="detect-trigger", protected=prot, out=tmp_path / "d",
                            score_private=priv, score_out=priv / "s.json"))  # fmt: skip


def test_removed_by_strip_trigger() -> None:
    spec = transforms.parse_spec("strip-trigger:3")
    assert score.removed_by(spec, ["a b c d", "a b", "a"]) == [(0, 3), (0, 1), None]
    assert score.removed_by(transforms.parse_spec("jpeg:90"), ["a b c d"]) is None


# -- a tiny real poisoning ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory) -> Path:
    from mme.config import DataConfig
    from mme.ingest.prepare import prepare

    out = tmp_path_factory.mktemp("clean")
    prepare(DataConfig(source="synthetic", out=out, n_train=16, n_test=4, image_size=64))
    return out


@pytest.mark.parametrize("position", ["start", "random"])
def test_detect_trigger_on_a_real_poisoning(clean_set, tmp_path, monkeypatch, position) -> None:
    """``mme poison`` (MEM, tiny) -> detect-trigger from the public files: every trigger found,
    the clean captions back exactly; the score and oracle-strip agree."""
    from mme.config import PoisonConfig
    from mme.protection.poison import poison

    monkeypatch.setenv("MME_TRACKING", "off")
    fast = dict(model="mme-tiny-vit", rounds=1, surrogate_steps=1, batch_size=8, pgd_steps=1)
    fast |= dict(trigger_rounds=1, candidates=2, device="cpu", grid_samples=2)
    prot, priv = tmp_path / "mem", tmp_path / "priv"
    poison(PoisonConfig(clean=clean_set, out=prot, private=priv, trigger_position=position, **fast))
    clean = [s.captions for s in shards.iter_samples(clean_set, "train")]
    out_json = tmp_path / "score.json"
    flags = ["--private", str(priv), "--score-private", str(priv), "--score-out", str(out_json)]
    for spec in ("detect-trigger", "oracle-strip"):
        assert run_attack(prot, tmp_path / spec, spec, *flags) == 0
        assert captions_of(tmp_path / spec) == clean
        got = json.loads(out_json.read_text())
        assert (got["precision"], got["recall"], got["images_exact"]) == (1.0, 1.0, 16)
