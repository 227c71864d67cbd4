"""DomainNet-layout folders as :class:`ImageDomains` (domains as tasks, as in the Grad-TAE paper).

Layout (the official download unpacked in one folder)::

    root/<domain>/<class>/<file>.jpg
    root/<domain>_train.txt     lines "<domain>/<class>/<file>.jpg <class_index>"
    root/<domain>_test.txt

``datasets.load_dataset("imagefolder", data_dir=root)`` cannot read this folder (it takes the
txt lists for splits, and would number classes alphabetically), so the rows are built here from
the official lists: class ids follow the lists' class indices, and every listed image is decoded
once to catch broken files before training does.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.families.image.domains import ImageDomains, contract_features, stratified_split

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
_LIST_SPLITS = ("train", "test")


def _discover(root: Path) -> tuple[list[str], list[str]]:
    """Domain folders and split-list files found in ``root`` (for messages and defaults)."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    lists = sorted(p.name for p in root.glob("*_t*.txt") if p.is_file())
    return folders, lists


def _read_list(path: Path) -> list[tuple[str, int]]:
    """``(relative path, class index)`` of every line of an official split list."""
    entries = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise TaeError(
                    f"{path}, line {number}: expected '<domain>/<class>/<file> <class_index>', "
                    f"got {line.strip()!r}."
                )
            rel = parts[0].replace("\\", "/")
            if rel.count("/") < 2:
                raise TaeError(
                    f"{path}, line {number}: the path {rel!r} is not '<domain>/<class>/<file>'."
                )
            entries.append((rel, int(parts[1])))
    return entries


def _check_image(path: Path) -> str | None:
    """``None`` if the file decodes, else why not (missing, not an image, truncated)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "file not found"
    try:
        with Image.open(path) as image:
            image.draft(image.mode, (64, 64))  # JPEG: decode at reduced scale; still reads it all
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"does not decode ({type(err).__name__}: {err})"
    return None


def _class_names(
    lists: dict[tuple[str, str], list[tuple[str, int]]],
) -> dict[int, str]:
    """Class index → class name from the lists; one name per index and one index per name."""
    by_index: dict[int, tuple[str, str]] = {}
    by_name: dict[str, tuple[int, str]] = {}
    for (domain, split), entries in lists.items():
        source = f"{domain}_{split}.txt"
        for rel, index in entries:
            name = rel.split("/")[-2]
            if by_index.setdefault(index, (name, source))[0] != name:
                raise TaeError(
                    f"class index {index} names {by_index[index][0]!r} in {by_index[index][1]} "
                    f"but {name!r} in {source}; the lists must agree on class indices."
                )
            if by_name.setdefault(name, (index, source))[0] != index:
                raise TaeError(
                    f"class {name!r} has index {by_name[name][0]} in {by_name[name][1]} but "
                    f"{index} in {source}; the lists must agree on class indices."
                )
    return {index: name for index, (name, _) in by_index.items()}


def load_domainnet(
    root: str | os.PathLike,
    domains: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    max_per_class: int | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    on_bad_image: Literal["raise", "skip"] = "raise",
    check_images: bool = True,
) -> ImageDomains:
    """Load DomainNet (or any folder in its layout) with one task per domain.

    Args:
        root: folder holding ``<domain>/`` and ``<domain>_train.txt`` / ``<domain>_test.txt``.
        domains: domains to load, in task order (default: every domain with a folder and both
            lists, sorted).
        classes: class names to keep (default: the classes listed in every chosen domain).
            Class ids follow the lists' class indices (ascending), renumbered from 0.
        max_per_class: keep at most this many images of each class per domain and official
            list (a seeded sample, file order kept), for small runs.
        validation_fraction: share of each domain's train-list images of every class moved to
            ``validation`` (seeded; the official test list stays ``test``).
        seed: seed of the sampling and the validation split.
        on_bad_image: ``"raise"`` on a listed image that is missing or does not decode, or
            ``"skip"`` to leave it out and record it in :attr:`ImageDomains.skipped`.
        check_images: decode every listed image once here (JPEG at reduced scale) so a broken
            file fails now, naming the file, rather than mid-training. Without it only missing
            files are caught.

    Rows keep the image file path (``image`` decodes lazily) and ``path``, the listed relative
    path.
    """
    root = Path(root)
    if on_bad_image not in ("raise", "skip"):
        raise TaeError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}.")
    if not 0.0 <= validation_fraction < 1.0:
        raise TaeError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}.")
    if max_per_class is not None and max_per_class < 1:
        raise TaeError(f"max_per_class must be a positive number of images, got {max_per_class}.")
    if not root.is_dir():
        raise TaeError(f"DomainNet root {root} is not a folder.")
    folders, list_files = _discover(root)
    known = sorted(
        set(folders)
        | {f.rsplit("_", 1)[0] for f in list_files if f.endswith(("_train.txt", "_test.txt"))}
    )
    if domains is None:
        domains = [d for d in known if d in folders and f"{d}_train.txt" in list_files]
        if not domains:
            raise TaeError(
                f"no DomainNet domain found in {root}: need <domain>/ folders with "
                f"<domain>_train.txt and <domain>_test.txt (found folders {folders}, lists "
                f"{list_files})."
            )
    domains = [str(d) for d in domains]
    if len(set(domains)) != len(domains):
        raise TaeError(f"domains {domains} name a domain twice.")
    for domain in domains:
        if domain not in known:
            raise TaeError(
                f"unknown domain {domain!r}; {root} has domains {known} (DomainNet's are "
                f"{list(DOMAINNET_DOMAINS)})."
            )
        if domain not in folders:
            raise TaeError(
                f"domain {domain!r} has no image folder {root / domain}; found folders {folders}."
            )
        for split in _LIST_SPLITS:
            if f"{domain}_{split}.txt" not in list_files:
                raise TaeError(
                    f"domain {domain!r} is missing its split list {root / f'{domain}_{split}.txt'}; "
                    f"found lists {list_files}."
                )

    lists = {(d, s): _read_list(root / f"{d}_{s}.txt") for d in domains for s in _LIST_SPLITS}
    index_to_name = _class_names(lists)
    name_to_index = {name: index for index, name in index_to_name.items()}
    present = {
        d: {rel.split("/")[-2] for s in _LIST_SPLITS for rel, _ in lists[(d, s)]} for d in domains
    }
    if classes is None:
        chosen = set.intersection(*(present[d] for d in domains))
        if not chosen:
            raise TaeError(f"domains {domains} share no class; pass classes= to choose some.")
    else:
        classes = [str(c) for c in classes]
        unknown = [c for c in classes if c not in name_to_index]
        if unknown:
            listed = sorted(name_to_index, key=name_to_index.get)
            raise TaeError(
                f"unknown class(es) {unknown}; the lists name {len(listed)} classes: "
                f"{listed[:30]}{' …' if len(listed) > 30 else ''}."
            )
        if len(set(classes)) != len(classes):
            raise TaeError(f"classes {classes} name a class twice.")
        chosen = set(classes)
    class_names = sorted(chosen, key=name_to_index.get)  # the lists' index order
    new_id = {name: i for i, name in enumerate(class_names)}
    for domain in domains:
        counts = {
            s: Counter(rel.split("/")[-2] for rel, _ in lists[(domain, s)]) for s in _LIST_SPLITS
        }
        for name in class_names:
            if counts["train"][name] == 0:
                where = "either list" if counts["test"][name] == 0 else f"{domain}_train.txt"
                raise TaeError(
                    f"class {name!r} has no images in domain {domain!r} ({where}); drop the "
                    "class (classes=) or the domain (domains=)."
                )

    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"image": [], "labels": [], "task": [], "split": [], "path": []}
    skipped: list[str] = []
    for task, domain in enumerate(domains):
        for split in _LIST_SPLITS:
            entries = [(rel, new_id[rel.split("/")[-2]]) for rel, _ in lists[(domain, split)]
                       if rel.split("/")[-2] in new_id]  # fmt: skip
            if max_per_class is not None:
                entries = _cap_per_class(entries, max_per_class, rng)
            for rel, label in entries:
                problem = (
                    _check_image(root / rel)
                    if check_images
                    else (None if (root / rel).is_file() else "file not found")
                )
                if problem is not None:
                    if on_bad_image == "raise":
                        raise TaeError(
                            f"image {root / rel} (listed in {domain}_{split}.txt) {problem}; "
                            "fix or remove the file, or pass on_bad_image='skip'."
                        )
                    skipped.append(rel)
                    continue
                rows["image"].append(str((root / rel).resolve()))
                rows["labels"].append(label)
                rows["task"].append(task)
                rows["split"].append(split)
                rows["path"].append(rel)
    _carve_validation(rows, validation_fraction, seed, len(class_names))
    task = np.asarray(rows["task"], dtype=np.int64)
    labels = np.asarray(rows["labels"], dtype=np.int64)
    is_train = np.asarray(rows["split"]) == "train"
    trained = np.bincount(task[is_train] * len(class_names) + labels[is_train],
                          minlength=len(domains) * len(class_names))  # fmt: skip
    for key in np.flatnonzero(trained == 0):
        domain, name = domains[key // len(class_names)], class_names[key % len(class_names)]
        raise TaeError(
            f"class {name!r} has no decodable training image in domain {domain!r} after "
            f"skipping {len(skipped)} bad file(s); fix the files or drop the class (classes=)."
        )

    from datasets import Dataset

    dataset = Dataset.from_dict(rows, features=contract_features(class_names, domains, True))
    return ImageDomains(
        dataset=dataset,
        task_names=domains,
        class_names=class_names,
        task_groups=None,
        description=(
            f"DomainNet-layout domains {domains} as tasks over {len(class_names)} classes "
            f"from {root}"
        ),
        skipped=skipped,
        info={
            "source": "domainnet",
            "root": str(root),
            "domains": domains,
            "max_per_class": max_per_class,
            "validation_fraction": validation_fraction,
            "seed": seed,
            "class_indices": [name_to_index[n] for n in class_names],
            "num_channels": 3,
        },
    )


def _cap_per_class(
    entries: list[tuple[str, int]], cap: int, rng: np.random.Generator
) -> list[tuple[str, int]]:
    """At most ``cap`` entries of every label (a seeded sample), in their original order."""
    labels = np.asarray([label for _, label in entries], dtype=np.int64)
    keep = np.zeros(len(entries), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) > cap:
            members = rng.choice(members, size=cap, replace=False)
        keep[members] = True
    return [entry for entry, k in zip(entries, keep, strict=True) if k]


def _carve_validation(rows: dict[str, list], fraction: float, seed: int, num_classes: int) -> None:
    """Move ``fraction`` of every (domain, class)'s train rows to validation, in place."""
    if fraction <= 0:
        return
    split = np.asarray(rows["split"], dtype=object)
    train = np.flatnonzero(split == "train")
    keys = np.asarray(rows["task"])[train] * num_classes + np.asarray(rows["labels"])[train]
    carved = stratified_split(keys, [fraction], seed)
    split[train[carved == 1]] = "validation"
    rows["split"] = split.tolist()
