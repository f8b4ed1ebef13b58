"""mme.models: our open_clip configs, local-only creation/loading, preprocessing."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from mme import models


def test_register_configs_is_idempotent() -> None:
    models.register_configs()
    models.register_configs()
    names = open_clip.list_models()
    assert {"mme-tiny-vit", "mme-tiny-rn"} <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", ["mme-tiny-vit", "mme-tiny-rn"])
def test_tiny_models_shapes(name: str) -> None:
    model, tokenizer = models.create_model(name)
    assert models.image_size(model) == 64
    assert not model.training
    tokens = tokenizer(["a red square", "a blue circle on a grey background"])
    assert tokens.shape == (2, 48)  # the config's context_length, honoured by the tokenizer
    with torch.no_grad():
        img = model.encode_image(torch.zeros(3, 3, 64, 64))
        txt = model.encode_text(tokens)
    assert img.shape == (3, 128) and txt.shape == (2, 128)


def test_unknown_model_lists_available() -> None:
    with pytest.raises(ValueError, match="mme-tiny-vit") as err:
        models.create_model("no-such-model")
    assert "mme-tiny-rn" in str(err.value) and "RN50" in str(err.value)


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.resolve_device("auto").type == expected
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            models.resolve_device("cuda")


@pytest.mark.parametrize("prefix,wrap", [("module.", True), ("", True), ("", False)])
def test_pretrained_checkpoint_formats(tmp_path, prefix: str, wrap: bool) -> None:
    torch.manual_seed(0)
    src, _ = models.create_model("mme-tiny-rn")
    sd = {prefix + k: v for k, v in src.state_dict().items()}
    path = tmp_path / "ck.pt"
    torch.save({"epoch": 1, "state_dict": sd} if wrap else sd, path)
    torch.manual_seed(1)
    dst, _ = models.create_model("mme-tiny-rn", pretrained=path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_pretrained_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        models.create_model("mme-tiny-vit", pretrained=tmp_path / "missing.pt")


def test_normalizer_is_openai() -> None:
    model, _ = models.create_model("mme-tiny-vit")
    mean, std = models.normalizer(model)
    assert mean.shape == std.shape == (3,)
    assert torch.allclose(mean, torch.tensor(open_clip.OPENAI_DATASET_MEAN))
    assert torch.allclose(std, torch.tensor(open_clip.OPENAI_DATASET_STD))


def test_preprocess_matches_val_transform_at_native_size() -> None:
    model, _ = models.create_model("mme-tiny-vit")
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    expected = models.val_transform(model)(Image.fromarray(pixels))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    assert torch.allclose(models.preprocess_images(x, model)[0], expected, atol=1e-5)


def test_preprocess_resizes_and_is_differentiable() -> None:
    model, _ = models.create_model("mme-tiny-rn")
    x = torch.rand(2, 3, 32, 48, requires_grad=True)
    y = models.preprocess_images(x, model)
    assert y.shape == (2, 3, 64, 64)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="B, 3, H, W"):
        models.preprocess_images(torch.rand(3, 64, 64), model)


def _fake_hf_cache(root, repo: str, filename: str, data: bytes):
    """The Hugging Face hub cache layout: models--org--name/{refs/main, snapshots/<rev>/file}."""
    rev = "0" * 40
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(data)


def test_pretrained_model_tag_from_the_local_hf_cache(tmp_path, monkeypatch):
    import io

    import open_clip
    import torch

    from mme.models import create_model

    torch.manual_seed(3)
    saved, _ = create_model("mme-tiny-vit")
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)
    _fake_hf_cache(
        tmp_path / "hub", "mme-test/tiny-vit", "open_clip_pytorch_model.bin", buf.getvalue()
    )
    tags = {"testtag": {"hf_hub": "mme-test/tiny-vit/"}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "mme-tiny-vit", tags)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for ref in ("mme-tiny-vit:testtag", "testtag"):
        loaded, _ = create_model("mme-tiny-vit", ref)
        for (k, a), b in zip(saved.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), k


def test_pretrained_tag_not_cached_or_unknown_names_the_fix(tmp_path, monkeypatch):
    import open_clip

    from mme.config import ConfigError
    from mme.models import create_model

    tags = {"testtag": {"hf_hub": "mme-test/not-cached/"}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "mme-tiny-vit", tags)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not in the local cache"):
        create_model("mme-tiny-vit", "mme-tiny-vit:testtag")
    with pytest.raises(ConfigError, match="tags of mme-tiny-vit: testtag"):
        create_model("mme-tiny-vit", "nosuchtag")
    with pytest.raises(ConfigError, match="pass --model RN50"):
        create_model("mme-tiny-vit", "RN50:openai")
