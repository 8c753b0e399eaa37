"""The shipped demo sample, the choice between it and ../shared/data, and the code that builds it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from faceforge.data import ImageFolderDataset, load_pairs
from faceforge.data.sample_data import (
    SAMPLE_ROOT,
    SHARED_DATA_ENV,
    build_sample,
    demo_data_paths,
    find_shared_data,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZE_BUDGET = 6_000_000  # bytes of files: what a wheel or a clone carries


def pair_files(pairs_txt: Path) -> set[str]:
    """Relative paths of the images an LFW-format pairs file names."""
    files = set()
    for fields in (line.split() for line in pairs_txt.read_text().splitlines()[1:] if line.strip()):
        name_a, i, name_b, j = fields if len(fields) == 4 else (fields[0], fields[1], fields[0], fields[2])
        files |= {f"{name_a}/{name_a}_{int(i):04d}.jpg", f"{name_b}/{name_b}_{int(j):04d}.jpg"}
    return files


def check_pairs(pairs_txt: Path, root: Path, per_fold: int) -> None:
    vset = load_pairs(pairs_txt, root)
    assert vset.num_pairs == 10 * 2 * per_fold
    for fold in range(10):
        assert vset.issame[vset.folds == fold].sum() == per_fold
        assert (~vset.issame[vset.folds == fold]).sum() == per_fold
    people = [
        {line.split()[k] for line in block for k in ((0,) if len(line.split()) == 3 else (0, 2))}
        for block in np.array_split(pairs_txt.read_text().splitlines()[1:], 10)
    ]
    for a in range(10):
        for b in range(a + 1, 10):
            assert not people[a] & people[b], f"folds {a} and {b} share people"
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*.jpg")}
    assert on_disk == pair_files(pairs_txt), "the images are exactly those the pairs need"


def test_shipped_sample_loads_and_is_balanced() -> None:
    train = ImageFolderDataset(SAMPLE_ROOT / "train")
    assert train.num_classes >= 50
    assert np.bincount(train.labels).min() >= 10
    assert max(train.read_image(0).shape[:2]) <= 128
    check_pairs(SAMPLE_ROOT / "lfw" / "pairs.txt", SAMPLE_ROOT / "lfw", per_fold=20)


def test_shipped_sample_fits_the_size_budget_and_gives_credit() -> None:
    size = sum(p.stat().st_size for p in SAMPLE_ROOT.rglob("*") if p.is_file())
    assert size <= SIZE_BUDGET, f"sample is {size} bytes"
    readme = (SAMPLE_ROOT / "README.md").read_text()
    for credit in ("Deep Learning Face Attributes in the Wild", "Labeled Faces in the Wild", "non-commercial"):
        assert credit in readme


def make_shared(root: Path) -> Path:
    (root / "shared" / "data" / "celeba_ids").mkdir(parents=True)
    (root / "shared" / "data" / "lfw").mkdir()
    (root / "shared" / "data" / "lfw" / "pairs.txt").write_text("10\t300\n")
    return root / "shared" / "data"


def test_demo_data_prefers_shared_data(tmp_path: Path) -> None:
    shared = make_shared(tmp_path)
    demo = demo_data_paths(shared)
    assert (demo.train_root, demo.pairs, demo.pairs_root) == (
        shared / "celeba_ids",
        shared / "lfw" / "pairs.txt",
        shared / "lfw",
    )
    assert demo.source.startswith("shared data")


def test_demo_data_falls_back_to_the_shipped_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHARED_DATA_ENV, raising=False)
    demo = demo_data_paths(tmp_path)
    assert (demo.train_root, demo.pairs, demo.pairs_root) == (
        SAMPLE_ROOT / "train",
        SAMPLE_ROOT / "lfw" / "pairs.txt",
        SAMPLE_ROOT / "lfw",
    )
    assert demo.source.startswith("shipped sample")


def test_shared_data_is_found_from_env_or_by_walking_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = make_shared(tmp_path / "a")
    monkeypatch.setenv(SHARED_DATA_ENV, str(shared))
    assert find_shared_data() == shared
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=SHARED_DATA_ENV):
        demo_data_paths()
    monkeypatch.delenv(SHARED_DATA_ENV)
    deep = tmp_path / "a" / "project" / "runs"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_shared_data() == shared


def test_build_sample_reproduces_a_valid_set(tmp_path: Path) -> None:
    if not (SHARED / "celeba_ids").is_dir():
        pytest.skip("../shared/data is not present")
    settings = dict(identities=3, images_per_identity=4, pairs_per_fold=2, size=64, lfw_size=50)
    summary = build_sample(SHARED, tmp_path / "a", **settings)
    assert summary["identities"] == 3 and summary["train_images"] == 12 and summary["pairs"] == 40
    train = ImageFolderDataset(tmp_path / "a" / "train")
    assert train.num_classes == 3 and len(train) == 12
    assert max(train.read_image(0).shape[:2]) == 64
    check_pairs(tmp_path / "a" / "lfw" / "pairs.txt", tmp_path / "a" / "lfw", per_fold=2)
    build_sample(SHARED, tmp_path / "b", **settings)
    for path in (tmp_path / "a").rglob("*.*"):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    with pytest.raises(FileExistsError, match="remove it"):
        build_sample(SHARED, tmp_path / "a", **settings)
