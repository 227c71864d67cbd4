"""Image-domain data: the DomainNet loader, ``from_dataset``, pixel values, the digits default."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hf_tae.errors import TaeError

# class indices deliberately not in alphabetical order; "kiwi" exists only in sketch
CLASSES = {"zebra": 0, "apple": 1, "mug": 2, "kiwi": 3}
DOMAINS = ("clipart", "sketch", "real")
N_TRAIN, N_TEST = 4, 2


def _color(domain: str, name: str, k: int) -> tuple[int, int, int]:
    return (40 * DOMAINS.index(domain) + 20, 50 * CLASSES[name] + 30, 20 * k + 10)


def _write_domainnet(root: Path) -> dict[str, tuple[str, str, str]]:
    """Tiny JPEGs in DomainNet's layout; returns relative path -> (domain, class, list split)."""
    from PIL import Image

    written = {}
    for domain in DOMAINS:
        lines = {"train": [], "test": []}
        for name, index in CLASSES.items():
            if name == "kiwi" and domain != "sketch":
                continue
            (root / domain / name).mkdir(parents=True)
            for k in range(N_TRAIN + N_TEST):
                rel = f"{domain}/{name}/{domain}_{index:03d}_{k:06d}.jpg"
                Image.new("RGB", (6, 6), _color(domain, name, k)).save(root / rel, quality=95)
                split = "train" if k < N_TRAIN else "test"
                lines[split].append(f"{rel} {index}")
                written[rel] = (domain, name, split)
        for split, rows in lines.items():
            (root / f"{domain}_{split}.txt").write_text("\n".join(rows) + "\n")
    return written


@pytest.fixture
def domainnet_root(tmp_path):
    root = tmp_path / "domainnet"
    written = _write_domainnet(root)
    return root, written


# ----------------------------------------------------------------------------- DomainNet
def test_domainnet_labels_tasks_splits(domainnet_root):
    from hf_tae.families.image.domainnet import load_domainnet

    root, written = domainnet_root
    domains = load_domainnet(root, domains=["sketch", "clipart"], validation_fraction=0.25)
    assert domains.task_names == ["sketch", "clipart"]
    assert domains.class_names == ["zebra", "apple", "mug"]  # the lists' index order; no kiwi
    assert domains.task_groups is None and domains.skipped == []
    ds = domains.dataset
    assert ds.features["labels"].names == domains.class_names
    assert ds.features["task"].names == ["sketch", "clipart"]
    rows = ds.select_columns(["labels", "task", "split", "path"]).to_dict()
    assert len(rows["path"]) == 2 * 3 * (N_TRAIN + N_TEST)
    per_key = Counter()
    for label, task, split, rel in zip(*rows.values(), strict=True):
        domain, name, listed = written[rel]
        assert domains.class_names[label] == name and domains.task_names[task] == domain
        assert split == listed or (listed == "train" and split == "validation")
        per_key[(domain, name, split)] += 1
    for domain in ("sketch", "clipart"):
        for name in domains.class_names:  # 25% of 4 train images per domain and class
            assert per_key[(domain, name, "validation")] == 1
            assert per_key[(domain, name, "train")] == N_TRAIN - 1
            assert per_key[(domain, name, "test")] == N_TEST
    row = ds[0]  # the image decodes to what was written
    domain, name, _ = written[row["path"]]
    k = int(Path(row["path"]).stem.split("_")[-1])
    pixel = np.asarray(row["image"].convert("RGB"))[3, 3].astype(int)
    assert np.abs(pixel - np.array(_color(domain, name, k))).max() <= 6
    again = load_domainnet(root, domains=["sketch", "clipart"], validation_fraction=0.25)
    assert again.dataset["split"] == rows["split"]  # seeded


def test_domainnet_chosen_classes_and_cap(domainnet_root):
    from hf_tae.families.image.domainnet import load_domainnet

    root, _ = domainnet_root
    domains = load_domainnet(
        root, domains=["sketch"], classes=["mug", "kiwi", "zebra"], max_per_class=3,
        validation_fraction=0.0,
    )  # fmt: skip
    assert domains.class_names == ["zebra", "mug", "kiwi"]  # index order, not the order given
    counts = Counter(zip(domains.dataset["labels"], domains.dataset["split"], strict=True))
    assert all(counts[(label, "train")] == 3 for label in range(3))
    assert all(counts[(label, "test")] == N_TEST for label in range(3))


def test_domainnet_bad_inputs(domainnet_root):
    from hf_tae.families.image.domainnet import load_domainnet

    root, _ = domainnet_root
    with pytest.raises(TaeError, match=r"unknown domain 'painting'.*clipart"):
        load_domainnet(root, domains=["painting"])
    with pytest.raises(TaeError, match=r"unknown class.*'pear'.*zebra"):
        load_domainnet(root, classes=["pear"])
    with pytest.raises(TaeError, match=r"'kiwi'.*domain 'clipart'"):
        load_domainnet(root, domains=["clipart", "sketch"], classes=["kiwi"])
    (root / "real_test.txt").unlink()
    with pytest.raises(TaeError, match=r"real_test\.txt.*found lists"):
        load_domainnet(root, domains=["clipart", "real"])
    (root / "sketch").rename(root / "sketch_moved")
    with pytest.raises(TaeError, match=r"sketch.*no image folder.*found folders"):
        load_domainnet(root, domains=["sketch"])


def test_domainnet_bad_image_raise_or_skip(domainnet_root):
    from hf_tae.families.image.domainnet import load_domainnet

    root, written = domainnet_root
    broken = next(rel for rel, (d, n, s) in written.items() if d == "clipart" and s == "train")
    (root / broken).write_bytes(b"not a jpeg")
    with pytest.raises(TaeError, match=Path(broken).name):
        load_domainnet(root, domains=["clipart"])
    domains = load_domainnet(root, domains=["clipart"], on_bad_image="skip")
    assert domains.skipped == [broken]
    assert broken not in domains.dataset["path"]
    assert len(domains.dataset) == 3 * (N_TRAIN + N_TEST) - 1
    assert "skipped 1" in repr(domains)


def test_domainnet_save_load_round_trip(domainnet_root, tmp_path):
    from hf_tae.families.image.domainnet import load_domainnet
    from hf_tae.families.image.domains import ImageDomains

    root, _ = domainnet_root
    domains = load_domainnet(root, domains=["real", "clipart"])
    out = domains.save(tmp_path / "saved")
    with pytest.raises(TaeError, match="already exists"):
        domains.save(out)
    loaded = ImageDomains.load(out)
    assert loaded.fingerprint() == domains.fingerprint()  # content-hashed: paths vs embedded
    assert loaded.task_names == domains.task_names and loaded.class_names == domains.class_names
    assert loaded.dataset["path"] == domains.dataset["path"]
    assert np.array_equal(
        np.asarray(loaded.dataset[5]["image"]), np.asarray(domains.dataset[5]["image"])
    )
    assert repr(loaded) == repr(domains)
    with pytest.raises(TaeError, match="image_domains.json"):
        ImageDomains.load(tmp_path)


# ----------------------------------------------------------------------------- from_dataset
def test_from_dataset_with_domain_column():
    from datasets import ClassLabel, Dataset, Features, Image, Value
    from PIL import Image as PILImage

    from hf_tae.families.image.domains import ImageDomains

    n = 120
    rng = np.random.default_rng(0)
    ds = Dataset.from_dict(
        {
            "img": [PILImage.fromarray(rng.integers(0, 255, (4, 4), dtype=np.uint8)) for _ in range(n)],
            "style": [["photo", "art", "cartoon"][i % 3] for i in range(n)],
            "y": [(i // 3) % 4 for i in range(n)],
        },
        features=Features({"img": Image(), "style": Value("string"),
                           "y": ClassLabel(names=["d", "c", "b", "a"])}),
    )  # fmt: skip
    domains = ImageDomains.from_dataset(
        ds, domain_column="style", label_column="y", image_column="img",
        validation_fraction=0.2, test_fraction=0.3, seed=4,
    )  # fmt: skip
    assert domains.task_names == ["art", "cartoon", "photo"]  # sorted strings
    assert domains.class_names == ["d", "c", "b", "a"]  # a ClassLabel keeps its order
    out = domains.dataset
    assert out.column_names == ["image", "labels", "task", "split"]
    assert out["labels"] == ds["y"]
    assert [domains.task_names[t] for t in out["task"]] == ds["style"]
    counts = Counter(zip(out["task"], out["labels"], out["split"], strict=True))
    for task in range(3):
        for label in range(4):  # 10 rows per (domain, class): 2 validation, 3 test, 5 train
            assert [counts[(task, label, s)] for s in ("train", "validation", "test")] == [5, 2, 3]
    assert np.array_equal(np.asarray(out[7]["image"]), np.asarray(ds[7]["img"]))
    again = ImageDomains.from_dataset(ds, "style", "y", "img", validation_fraction=0.2,
                                      test_fraction=0.3, seed=4)  # fmt: skip
    assert again.fingerprint() == domains.fingerprint()

    # a split column is kept; validation is carved from train when it has none
    with_split = ds.add_column("part", ["train" if i % 4 else "test" for i in range(n)])
    carved = ImageDomains.from_dataset(with_split, "style", "y", "img", split_column="part",
                                       validation_fraction=0.25)  # fmt: skip
    split = np.asarray(carved.dataset["split"])
    assert np.array_equal(split == "test", np.asarray(with_split["part"]) == "test")
    assert (split == "validation").sum() > 0
    with pytest.raises(TaeError, match="no column"):
        ImageDomains.from_dataset(ds, domain_column="domain", label_column="y", image_column="img")
    bad = with_split.map(lambda r: {"part": "holdout"})
    with pytest.raises(TaeError, match="holdout"):
        ImageDomains.from_dataset(bad, "style", "y", "img", split_column="part")


# ----------------------------------------------------------------------------- pixel values
def test_add_pixel_values_matches_numpy():
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    from hf_tae.families.image.preprocessing import add_pixel_values

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    ds = Dataset.from_dict(
        {"image": [PILImage.fromarray(a) for a in rgb], "k": list(range(5))},
        features=Features({"image": Image(), "k": Value("int64")}),
    )
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    out = add_pixel_values(ds, (6, 7), 3, mean, std, batch_size=2)
    got = out.select_columns(["pixel_values"]).with_format("numpy")[:]["pixel_values"]
    want = (rgb.transpose(0, 3, 1, 2) / 255.0 - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(
        std, (1, 3, 1, 1)
    )
    assert got.dtype == np.float32 and got.shape == (5, 3, 6, 7)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert out["k"] == ds["k"] and out.features["pixel_values"].shape == (3, 6, 7)

    gray = add_pixel_values(ds, (6, 7), 1, 0.5, 0.5)  # ITU-R 601-2 luma, as PIL's "L"
    got = gray.select_columns(["pixel_values"]).with_format("numpy")[:]["pixel_values"]
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(got[:, 0], (luma / 255.0 - 0.5) / 0.5, atol=2.5 / 255 / 0.5)

    small = add_pixel_values(ds, 3, 1, 0.0, 1.0)
    assert small.features["pixel_values"].shape == (1, 3, 3)
    with pytest.raises(TaeError, match="std"):
        add_pixel_values(ds, 4, 3, 0.5, [0.5, 0.0, 0.5])
    with pytest.raises(TaeError, match="num_channels"):
        add_pixel_values(ds, 4, 2, 0.5, 0.5)


# ----------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits():
    from hf_tae.families.image.digits import make_digit_domains

    return make_digit_domains(seed=0)


def _arrays(domains):
    ds = domains.dataset
    images = np.stack([np.asarray(image) for image in ds["image"]])
    source = np.asarray([int(p.split("/")[1]) for p in ds["path"]])
    return images, np.asarray(ds["task"]), np.asarray(ds["split"]), np.asarray(ds["labels"]), source


def test_digit_domains_shapes_splits_groups(digits):
    from sklearn.datasets import load_digits

    views = ("upright", "tiles-a", "tiles-b", "tiles-c")
    assert digits.task_names == [f"{v}-{s}" for v in views for s in ("clean", "noisy")]
    assert digits.task_groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert digits.num_channels == 1
    images, task, split, labels, source = _arrays(digits)
    assert images.shape[1:] == (8, 8) and images.dtype == np.uint8
    assert np.array_equal(labels, load_digits().target[source])
    n = digits.num_tasks
    train_sets = [set(source[(task == t) & (split == "train")]) for t in range(n)]
    for a in range(n):  # every domain trains on its own digits
        for b in range(a + 1, n):
            assert not train_sets[a] & train_sets[b]
    held_out = set(source[split != "train"])
    assert not held_out & set().union(*train_sets)
    for name in ("train", "validation", "test"):  # stratified: same class mix in every domain
        per_domain = np.stack(
            [np.bincount(labels[(task == t) & (split == name)], minlength=10) for t in range(n)]
        )
        assert (per_domain.max(0) - per_domain.min(0)).max() <= (1 if name == "train" else 0)
    assert 125 <= (split[task == 0] == "train").sum() <= 145
    assert 500 <= (split[task == 0] == "test").sum() <= 560


def _tiles_numpy(image: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Independent tile rearrangement: output tile i (row-major, 2×2) is input tile perm[i]."""
    out = np.empty_like(image)
    for i, j in enumerate(perm):
        out[2 * (i // 4) : 2 * (i // 4) + 2, 2 * (i % 4) : 2 * (i % 4) + 2] = image[
            2 * (j // 4) : 2 * (j // 4) + 2, 2 * (j % 4) : 2 * (j % 4) + 2
        ]
    return out


def test_digit_transforms_against_numpy(digits):
    from sklearn.datasets import load_digits

    from hf_tae.families.image.digits import make_digit_domains, tile_permutation

    raw = np.round(load_digits().images / 16.0 * 255).astype(np.uint8)
    images, task, _, _, source = _arrays(digits)
    perms = {}
    for view in ("tiles-a", "tiles-b", "tiles-c"):
        perm = tile_permutation(view, 1.0)
        assert sorted(perm) == list(range(16)) and np.all(perm != np.arange(16))  # all move
        perms[view] = perm
    assert len({tuple(p) for p in perms.values()}) == 3
    expect = {"upright-clean": lambda a: a}
    expect.update({f"{v}-clean": (lambda a, p=p: _tiles_numpy(a, p)) for v, p in perms.items()})
    for name, fn in expect.items():
        rows = np.flatnonzero(task == digits.task_names.index(name))
        for r in rows[::37]:
            assert np.array_equal(images[r], fn(raw[source[r]])), name
    noisy = np.flatnonzero(task == digits.task_names.index("tiles-b-noisy"))
    clean = np.stack([_tiles_numpy(raw[i], perms["tiles-b"]) for i in source[noisy]])
    diff = images[noisy].astype(float) - clean
    assert 0.08 * 255 < diff.std() < 0.2 * 255  # noise_std 0.15, clipped at 0 and 1

    other = make_digit_domains(views=("rot90", "jigsaw"), styles=("clean",), train_per_domain=20)
    images, task, split, _, source = _arrays(other)
    keep = split != "test"  # a few hundred rows suffice
    for t, fn in enumerate(
        [np.rot90, lambda a: np.block([[a[4:, 4:], a[4:, :4]], [a[:4, 4:], a[:4, :4]]])]
    ):
        for r in np.flatnonzero(keep & (task == t))[::11]:
            assert np.array_equal(images[r], fn(raw[source[r]]))


def test_digit_domains_seeded_and_knobs(digits, tmp_path):
    from sklearn.datasets import load_digits

    from hf_tae.families.image.digits import make_digit_domains, tile_permutation
    from hf_tae.families.image.domains import ImageDomains

    half = tile_permutation("tiles-a", 0.5)
    moved = np.flatnonzero(half != np.arange(16))
    assert len(moved) == 8  # conflict 0.5 moves half of the tiles, all of them ones 1.0 moves
    assert np.array_equal(tile_permutation("tiles-a", 0.0), np.arange(16))
    small = make_digit_domains(views=("upright", "tiles-a"), styles=("clean",), conflict=0.0,
                               train_per_domain=50, seed=3)  # fmt: skip
    images, task, split, labels, source = _arrays(small)
    assert (split[task == 0] == "train").sum() == 50
    assert np.all(np.bincount(labels[(task == 1) & (split == "train")], minlength=10) == 5)
    raw = np.round(load_digits().images / 16 * 255)
    assert np.array_equal(images, raw[source].astype(np.uint8))  # conflict 0: all upright
    kwargs = dict(views=("upright", "tiles-a"), styles=("clean",), train_per_domain=50)
    assert small.fingerprint() != make_digit_domains(conflict=0.0, seed=4, **kwargs).fingerprint()
    assert small.fingerprint() == make_digit_domains(conflict=0.0, seed=3, **kwargs).fingerprint()
    assert small.fingerprint() != make_digit_domains(conflict=1.0, seed=3, **kwargs).fingerprint()
    with pytest.raises(TaeError, match="unknown.*'spin'"):
        make_digit_domains(views=("upright", "spin"))
    with pytest.raises(TaeError, match="train_per_domain"):
        make_digit_domains(train_per_domain=1000)
    with pytest.raises(TaeError, match="conflict"):
        make_digit_domains(conflict=1.5)

    out = digits.save(tmp_path / "digits")
    loaded = ImageDomains.load(out)
    assert loaded.fingerprint() == digits.fingerprint()
    assert loaded.task_groups.tolist() == digits.task_groups.tolist()
    assert loaded.description == digits.description and loaded.info == digits.info
    assert loaded.num_channels == 1
