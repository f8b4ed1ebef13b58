"""Source readers: CSV split files, image folders, WebDataset shards (all built in tmp_path)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mme import fsio
from mme.ingest.sources import iter_csv, iter_folder, iter_webdataset
from mme.shards import Sample, write_shards

FLICKR8K_DEV = Path("/work/shared/data/flickr8k-dev")


def jpeg(colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="JPEG")
    return buf.getvalue()


def put(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data or jpeg())
    return path


# --------------------------------------------------------------------------------------- csv


def test_csv_groups_non_adjacent_rows(tmp_path):
    for name in "abc":
        put(tmp_path / "images" / f"{name}.jpg", jpeg((ord(name), 0, 0)))
    (tmp_path / "captions.csv").write_text(
        "image,caption_number,caption,id,images\n"
        "a.jpg,0,a one,0,images/a.jpg\n"
        "b.jpg,0,b one,1,images/b.jpg\n"
        'a.jpg,1,"a two, with a comma",0,images/a.jpg\n'
        "c.jpg,0,c one,2,images/c.jpg\n"
        "b.jpg,1,b two,1,images/b.jpg\n"
    )
    items = list(iter_csv(tmp_path / "captions.csv", split="train"))
    assert [i.id for i in items] == ["a", "b", "c"]
    assert [i.captions for i in items] == [
        (b"a one", b"a two, with a comma"),
        (b"b one", b"b two"),
        (b"c one",),
    ]
    assert {i.split for i in items} == {"train"}
    assert items[0].source == "images/a.jpg"
    assert items[1].load() == (tmp_path / "images" / "b.jpg").read_bytes()


def test_csv_two_column_variant_and_missing_file(tmp_path):
    put(tmp_path / "x.jpg")
    (tmp_path / "s.csv").write_text("caption,images\nfirst,x.jpg\nsecond,x.jpg\nlost,gone.jpg\n")
    x, gone = iter_csv(tmp_path / "s.csv")
    assert (x.id, x.captions, x.split) == ("x", (b"first", b"second"), None)
    assert x.load() == (tmp_path / "x.jpg").read_bytes()
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        gone.load()


@pytest.mark.parametrize("column", ["images", "caption"])
def test_csv_missing_column_names_it_and_lists_columns(tmp_path, column):
    header = "image,caption_number,caption,id" if column == "images" else "image,text,images"
    (tmp_path / "s.csv").write_text(header + "\n")
    with pytest.raises(ValueError, match=f"no column '{column}'") as info:
        iter_csv(tmp_path / "s.csv")  # raises at call time, before any item
    assert "'image'" in str(info.value)  # the columns present are listed


@pytest.mark.parametrize("delimiter", ["\t", "|", ";"])
def test_csv_custom_delimiter(tmp_path, delimiter):
    put(tmp_path / "x.jpg")
    rows = [["images", "caption"], ["x.jpg", "a, b"], ["x.jpg", "c"]]
    (tmp_path / "s.csv").write_text("".join(delimiter.join(r) + "\n" for r in rows))
    (item,) = iter_csv(tmp_path / "s.csv", delimiter=delimiter)
    assert item.captions == (b"a, b", b"c")


@pytest.mark.parametrize(
    "stored_at",
    ["root/data/flickr/Images/x.jpg", "root/Images/x.jpg", "root/x.jpg"],
)
def test_csv_rebases_absolute_paths_under_image_root(tmp_path, stored_at):
    put(tmp_path / stored_at, jpeg((1, 2, 3)))
    (tmp_path / "s.csv").write_text("images,caption\n/data/flickr/Images/x.jpg,a cap\n")
    (item,) = iter_csv(tmp_path / "s.csv", image_root=tmp_path / "root")
    assert item.id == "x"
    assert item.source == "/data/flickr/Images/x.jpg"
    assert item.load() == (tmp_path / stored_at).read_bytes()


def test_csv_existing_absolute_path_and_relative_image_root(tmp_path):
    absolute = put(tmp_path / "elsewhere" / "abs.jpg", jpeg((1, 1, 1)))
    put(tmp_path / "root" / "imgs" / "rel.jpg", jpeg((2, 2, 2)))
    put(tmp_path / "csvdir" / "imgs" / "rel.jpg", jpeg((3, 3, 3)))  # must NOT be used
    (tmp_path / "csvdir" / "s.csv").write_text(f"images,caption\n{absolute},a\nimgs/rel.jpg,b\n")
    kw = dict(image_root=tmp_path / "root", allow_absolute=True)  # issue 20: only when asked
    abs_item, rel_item = iter_csv(tmp_path / "csvdir" / "s.csv", **kw)
    assert abs_item.load() == absolute.read_bytes()
    assert rel_item.load() == (tmp_path / "root" / "imgs" / "rel.jpg").read_bytes()
    abs_item, _ = iter_csv(tmp_path / "csvdir" / "s.csv", image_root=tmp_path / "root")
    with pytest.raises(fsio.OutsideRoot):  # without the flag: outside the image root, unread
        abs_item.load()


def test_csv_keeps_invalid_utf8_and_drops_bom(tmp_path):
    put(tmp_path / "x.jpg")
    (tmp_path / "s.csv").write_bytes(
        b'\xef\xbb\xbfimages,caption\r\nx.jpg,caf\xe9\r\nx.jpg,"two\nlines"\r\nx.jpg,\r\n'
    )
    (item,) = iter_csv(tmp_path / "s.csv")
    assert item.captions == (b"caf\xe9", b"two\nlines", b"")  # hygiene decides about these


def test_csv_ids_unique_when_names_collide(tmp_path):
    (tmp_path / "s.csv").write_text(
        "images,caption\na/x.jpg,1\nb/x.jpg,2\nc.jpg,3\nd/c.png,4\n\u65e5\u672c.jpg,5\n"
    )
    ids = [i.id for i in iter_csv(tmp_path / "s.csv")]
    assert ids[:4] == ["a_x", "b_x", "c", "d_c"]
    assert ids[4].startswith("id_") and len(set(ids)) == 5


def test_csv_empty_image_cell_is_an_error(tmp_path):
    (tmp_path / "s.csv").write_text("images,caption\nx.jpg,a\n,b\n")
    with pytest.raises(ValueError, match="line 3"):
        list(iter_csv(tmp_path / "s.csv"))


@pytest.mark.skipif(not FLICKR8K_DEV.is_dir(), reason="flickr8k-dev sample not present")
def test_real_flickr8k_dev_csv():
    items = list(iter_csv(FLICKR8K_DEV / "captions.csv"))
    assert len(items) == 1000
    assert all(len(i.captions) == 5 for i in items)
    assert len({i.id for i in items}) == 1000
    with Image.open(io.BytesIO(items[0].load())) as im:
        assert im.format == "JPEG"


# ------------------------------------------------------------------------------------ folder


def test_folder_items_captions_and_order(tmp_path):
    put(tmp_path / "b.png")
    put(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_bytes(b"first caption\r\nsecond caption\n")
    put(tmp_path / "sub" / "c.JPEG")
    (tmp_path / "sub" / "c.txt").write_bytes(b"only one")
    put(tmp_path / ".hidden.jpg")
    put(tmp_path / ".cache" / "d.jpg")
    (tmp_path / "README.md").write_text("not an image")
    items = list(iter_folder(tmp_path))
    assert [i.id for i in items] == ["a", "b", "sub_c"]
    assert [i.captions for i in items] == [
        (b"first caption", b"second caption"),
        (),
        (b"only one",),
    ]
    assert {i.split for i in items} == {None}
    assert items[2].load() == (tmp_path / "sub" / "c.JPEG").read_bytes()


def test_folder_same_stem_different_extension(tmp_path):
    put(tmp_path / "a.jpg")
    put(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("shared caption\n")
    items = list(iter_folder(tmp_path))
    assert [i.id for i in items] == ["a_jpg", "a_png"]
    assert items[0].captions == items[1].captions == (b"shared caption",)


def test_folder_train_test_subfolders_give_split(tmp_path):
    for split in ("train", "test"):
        put(tmp_path / split / "dog" / "1.jpg")
    items = list(iter_folder(tmp_path))
    assert [(i.id, i.split) for i in items] == [("test_dog_1", "test"), ("train_dog_1", "train")]


def test_folder_images_outside_split_folders_are_an_error(tmp_path):
    for rel in ("train/1.jpg", "test/1.jpg", "val/1.jpg"):
        put(tmp_path / rel)
    with pytest.raises(ValueError, match="val/1.jpg"):
        iter_folder(tmp_path)


def test_folder_missing_root(tmp_path):
    with pytest.raises(NotADirectoryError):
        iter_folder(tmp_path / "nope")


# -------------------------------------------------------------------------------- webdataset


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_members(shard: int) -> list[tuple[str, bytes]]:
    """Three samples as img2dataset writes them: jpg + txt + json, keys like 00000/000000001."""
    members = []
    for n in range(3):
        key = f"{shard:05d}/{shard:05d}{n:04d}"
        meta = {"caption": f"json caption {n}", "url": f"http://x/{n}.jpg", "key": key}
        members += [(f"{key}.jpg", jpeg((n, 0, 0))), (f"{key}.json", json.dumps(meta).encode())]
        if n != 1:  # sample 1 has no txt: its caption comes from the json
            members.append((f"{key}.txt", f"txt caption {n}\nsecond line {n}".encode()))
    return members


def test_webdataset_img2dataset_layout(tmp_path):
    shard = write_tar(tmp_path / "00000.tar", img2dataset_members(0))
    items = list(iter_webdataset(shard))
    assert [i.id for i in items] == ["00000_000000000", "00000_000000001", "00000_000000002"]
    assert items[0].captions == (b"txt caption 0", b"second line 0")
    assert items[1].captions == (b"json caption 1",)
    assert items[2].load() == jpeg((2, 0, 0))
    assert items[0].source == f"{shard}:00000/000000000.jpg"
    assert {i.split for i in items} == {None}


@pytest.mark.parametrize("as_pattern", [False, True])
def test_webdataset_directory_or_brace_pattern(tmp_path, as_pattern):
    for n in range(2):
        write_tar(tmp_path / f"train-{n:06d}.tar", img2dataset_members(n))
    spec = str(tmp_path / "train-{000000..000001}.tar") if as_pattern else tmp_path
    items = list(iter_webdataset(spec))
    assert len(items) == 6 and {i.split for i in items} == {"train"}
    assert items[3].id == "00001_000010000"


def test_webdataset_sample_without_image_or_caption(tmp_path):
    shard = write_tar(
        tmp_path / "test-0.tar",
        [("k1.json", b'{"status": "failed"}'), ("k2.png", jpeg()), ("k2.json", b"{bad json")],
    )
    k1, k2 = iter_webdataset(shard)
    assert (k1.id, k1.split, k1.captions) == ("k1", "test", ())
    with pytest.raises(FileNotFoundError, match="no image member"):
        k1.load()
    assert k2.captions == () and k2.load() == jpeg()


def test_webdataset_duplicate_keys_across_shards_get_unique_ids(tmp_path):
    for name in ("a.tar", "b.tar"):
        write_tar(tmp_path / name, [("same.jpg", jpeg()), ("same.txt", b"cap")])
    assert [i.id for i in iter_webdataset(tmp_path)] == ["same", "b_same"]


def test_webdataset_missing_shards(tmp_path):
    with pytest.raises(FileNotFoundError):
        iter_webdataset(tmp_path / "x-{0..1}.tar")
    with pytest.raises(FileNotFoundError):
        iter_webdataset(tmp_path)  # folder without tars


def test_webdataset_reads_mme_shards(tmp_path):
    samples = [
        Sample(f"s{n}", jpeg((n, n, n)), "jpg", [f"cap {n}", "other"], {"id": f"s{n}"})
        for n in range(3)
    ]
    write_shards(tmp_path, "test", samples, maxcount=2)
    items = list(iter_webdataset(tmp_path))
    assert [(i.id, i.split, i.captions) for i in items] == [
        (f"s{n}", "test", (f"cap {n}".encode(), b"other")) for n in range(3)
    ]
    assert items[2].load() == samples[2].image_bytes


# ------------------------------------------------------------------- hugging face (pyarrow)


def _hf_table(pa, n: int = 3):
    import io as _io

    from PIL import Image as _Image

    rows = []
    for i in range(n):
        buf = _io.BytesIO()
        _Image.new("RGB", (20 + i, 20), (40 * i, 80, 120)).save(buf, "PNG")
        rows.append({"bytes": buf.getvalue(), "path": f"img{i}.png" if i else None})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    texts = [f"picture {i}" for i in range(n)]
    return pa.table({"image": pa.array(rows, type=image_type), "text": texts})


def _save_to_disk_layout(pa, folder: Path, table) -> None:
    """What datasets' save_to_disk writes (checked against datasets 5.2.0): an Arrow stream
    file plus state.json naming it."""
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (folder / "dataset_info.json").write_text("{}")


@pytest.mark.parametrize("layout", ["save_to_disk", "dataset_dict", "parquet"])
def test_hf_sources_read_images_and_captions(tmp_path, layout):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from mme.ingest.sources import iter_hf

    table = _hf_table(pa)
    root = tmp_path / "hf"
    if layout == "save_to_disk":
        _save_to_disk_layout(pa, root, table)
    elif layout == "dataset_dict":
        _save_to_disk_layout(pa, root / "train", table)
        (root / "dataset_dict.json").write_text('{"splits": ["train"]}')
    else:
        root.mkdir()
        pq.write_table(table, root / "train-00000-of-00001.parquet")
    items = list(iter_hf(root))
    assert len(items) == 3 and [i.captions for i in items][1] == (b"picture 1",)
    assert items[1].id == "img1" and items[0].load()[:4] == b"\x89PNG"
    assert {i.split for i in items} == ({None} if layout == "save_to_disk" else {"train"})


def test_hf_source_names_missing_columns_and_escaping_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    from mme.ingest.sources import iter_hf

    root = tmp_path / "hf"
    _save_to_disk_layout(pa, root, pa.table({"pixels": [b"x"], "label": ["a"]}))
    with pytest.raises(ValueError, match="no image column 'image'.*pixels"):
        list(iter_hf(root))
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../x.arrow"}]}))
    with pytest.raises(ValueError, match="outside the folder"):
        list(iter_hf(root))


def test_prepare_and_protect_from_a_hf_folder(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    from mme import cli

    monkeypatch.setenv("MME_TRACKING", "off")
    _save_to_disk_layout(pa, tmp_path / "hf", _hf_table(pa))
    argv = ["prepare", "--params", "none", "--source", "hf", "--input", str(tmp_path / "hf")]
    assert cli.main([*argv, "--out", str(tmp_path / "shards")]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["images"] == 3
