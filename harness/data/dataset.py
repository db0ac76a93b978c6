"""DAVIS-2017 and MOSE-style dataset layouts.

DAVIS-2017: ``JPEGImages/480p/<seq>/*.jpg``, ``Annotations/480p/<seq>/*.png``,
``ImageSets/2017/<split>.txt``. MOSE-style: ``JPEGImages/<seq>``, ``Annotations/<seq>`` and no ImageSets.
Only the first frame needs a mask (semi-supervised VOS); other masks, when present, are ground truth.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np

from harness.data.masks import DAVIS_PALETTE, VOID_ID, image_size, read_mask, read_palette
from harness.errors import DataError

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Sequence:
    """One video: its frames in order and the annotated frames' masks."""

    name: str
    frames: tuple[Path, ...]
    annotations: dict[str, Path] = field(default_factory=dict)

    @property
    def frame_names(self) -> list[str]:
        return [path.stem for path in self.frames]

    @property
    def first_mask_path(self) -> Path:
        return self.annotations[self.frames[0].stem]

    def frame_size(self, index: int = 0) -> tuple[int, int]:
        """(width, height) of frame ``index``."""
        return image_size(self.frames[index])

    def load_mask(self, frame_name: str) -> np.ndarray:
        """The mask of an annotated frame, checked against its frame's size."""
        if frame_name not in self.annotations:
            raise DataError(f"sequence {self.name!r} has no mask for frame {frame_name!r}")
        path = self.annotations[frame_name]
        mask = read_mask(path)
        frame_path = self.frames[self.frame_names.index(frame_name)]
        width, height = image_size(frame_path)
        if mask.shape != (height, width):
            raise DataError(
                f"mask {path} is {mask.shape[1]}x{mask.shape[0]} "
                f"but its frame {frame_path} is {width}x{height}"
            )
        return mask

    def check_frame_sizes(self) -> tuple[int, int]:
        """(width, height) shared by every frame; a DataError naming the first frame that differs.

        Predictions are written at the first frame's size, so a sequence must not mix sizes.
        """
        size = self.frame_size(0)
        for path in self.frames[1:]:
            other = image_size(path)
            if other != size:
                raise DataError(
                    f"sequence {self.name!r}: frame {path} is {other[0]}x{other[1]} but its first frame "
                    f"{self.frames[0]} is {size[0]}x{size[1]}; every frame of a sequence must have one size"
                )
        return size

    def missing_annotations(self) -> list[str]:
        """Frame names without a ground-truth mask (the first frame always has one)."""
        return [name for name in self.frame_names if name not in self.annotations]

    @property
    def has_ground_truth(self) -> bool:
        """True when any frame after the first is annotated (a val-like sequence, not a test-dev one)."""
        return len(self.annotations) > 1

    def first_mask(self) -> np.ndarray:
        return self.load_mask(self.frames[0].stem)

    def object_ids(self) -> list[int]:
        """The objects of the sequence: the ids present in its first-frame mask (0 and void excluded)."""
        ids = np.unique(self.first_mask())
        return [int(i) for i in ids if i not in (0, VOID_ID)]

    @property
    def fully_annotated(self) -> bool:
        return all(name in self.annotations for name in self.frame_names)


@dataclass(frozen=True)
class Dataset:
    root: Path
    split: str
    layout: str  # "davis" or "mose"
    sequences: tuple[Sequence, ...]
    palette: list[int]

    def __len__(self) -> int:
        return len(self.sequences)

    def sequence(self, name: str) -> Sequence:
        for sequence in self.sequences:
            if sequence.name == name:
                return sequence
        raise DataError(f"no sequence {name!r} in {self.root} ({self.split})")


def check_entry_name(name: str, what: str, source: object) -> str:
    """``name`` if it is one plain path component; a DataError otherwise.

    Names read from data (split files, folder listings, configs) become paths under a dataset root or an
    output folder. An absolute name, ``..`` or a separator would make them read or write elsewhere.
    """
    plain = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not PureWindowsPath(name).drive
    )
    if not plain:
        raise DataError(
            f"{source}: {what} {name!r} is not a plain name (absolute paths, '..' and separators are refused)"
        )
    return name


def _check_unique(names: list[str], what: str, source: object) -> None:
    """Duplicates would be processed and counted twice in the metrics."""
    duplicates = [name for name, count in Counter(names).items() if count > 1]
    if duplicates:
        raise DataError(f"{source}: {what} listed more than once: {', '.join(duplicates)}")


def _list_images(folder: Path, suffixes: tuple[str, ...]) -> tuple[Path, ...]:
    return tuple(
        sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith("."))
    )


def _load_sequence(name: str, frame_dir: Path, mask_dir: Path) -> Sequence:
    if not frame_dir.is_dir():
        raise DataError(f"sequence {name!r}: frame folder {frame_dir} does not exist")
    frames = _list_images(frame_dir, FRAME_SUFFIXES)
    if not frames:
        raise DataError(f"sequence {name!r}: no frames (.jpg/.png) in {frame_dir}")
    annotations = {p.stem: p for p in _list_images(mask_dir, (".png",))} if mask_dir.is_dir() else {}
    if frames[0].stem not in annotations:
        raise DataError(
            f"sequence {name!r}: no first-frame mask; expected {mask_dir / (frames[0].stem + '.png')}"
        )
    return Sequence(name=name, frames=frames, annotations=annotations)


def read_split(root: Path, split: str) -> list[str]:
    """Sequence names of a DAVIS split file (``ImageSets/2017/<split>.txt``)."""
    imagesets = root / "ImageSets" / "2017"
    split_file = imagesets / f"{split}.txt"
    if not split_file.is_file():
        known = sorted(p.stem for p in imagesets.glob("*.txt")) if imagesets.is_dir() else []
        raise DataError(f"no split file {split_file}; splits found: {', '.join(known) or 'none'}")
    names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"split file {split_file} lists no sequences")
    for name in names:
        check_entry_name(name, "sequence name", split_file)
    _check_unique(names, "sequences", split_file)
    return names


def _setup_hint(root: Path) -> str:
    """The command that creates a missing dataset root (paths are relative to the working directory)."""
    if root.name == "synth":
        return f"generate the synthetic dataset with: harness data synth --out {root}"
    return f"download DAVIS-2017 with: harness data download davis2017 --root {root}"


def open_dataset(
    root: str | Path, split: str = "val", sequences: list[str] | None = None, resolution: str = "480p"
) -> Dataset:
    """Open a DAVIS-2017 or MOSE-style dataset, checking that every sequence has frames and a first mask.

    ``sequences`` restricts the dataset to a subset (in the given order).
    """
    root = Path(root).expanduser()
    # both become path components: of the frames (resolution) and of the split and result files (split)
    check_entry_name(split, "split", "dataset.split")
    check_entry_name(resolution, "resolution", "dataset.resolution")
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist; {_setup_hint(root)}")
    if (root / "JPEGImages" / resolution).is_dir():
        layout = "davis"
        frame_root = root / "JPEGImages" / resolution
        mask_root = root / "Annotations" / resolution
        names = read_split(root, split)
    elif (root / "JPEGImages").is_dir():
        layout = "mose"
        frame_root = root / "JPEGImages"
        mask_root = root / "Annotations"
        names = sorted(p.name for p in frame_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    else:
        raise DataError(
            f"{root} is not a dataset: expected JPEGImages/{resolution}/<sequence> (DAVIS-2017) "
            "or JPEGImages/<sequence> (MOSE-style)"
        )
    if sequences is not None:
        for name in sequences:
            check_entry_name(name, "sequence name", "dataset.sequences")
        _check_unique(list(sequences), "sequences", "dataset.sequences")
        unknown = [name for name in sequences if name not in names]
        if unknown:
            raise DataError(f"sequences not in {root} ({split}): {', '.join(unknown)}")
        names = list(sequences)
    if not names:
        raise DataError(f"no sequences in {root} ({split})")
    loaded = tuple(_load_sequence(name, frame_root / name, mask_root / name) for name in names)
    palette = read_palette(loaded[0].first_mask_path) or DAVIS_PALETTE
    return Dataset(root=root, split=split, layout=layout, sequences=loaded, palette=palette)
