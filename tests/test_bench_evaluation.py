"""The evaluation benchmark script: shape table, dataset generator and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.bench.evaluation import (
    DEFAULT_SHAPE_TABLE,
    ShapeRow,
    generate_shaped_dataset,
    main,
    read_shape_table,
)
from harness.data import open_dataset, read_mask
from harness.data.masks import image_size
from harness.errors import DataError
from harness.evaluation import evaluate_dataset

REFERENCE_TABLE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "davis2017_val_shape.tsv"
TINY = [
    ShapeRow("walk", frames=6, objects=2, width=96, height=64),
    ShapeRow("jump", frames=4, objects=1, width=120, height=80),
    ShapeRow("swim", frames=5, objects=3, width=80, height=80),
]


def test_packaged_shape_table_is_davis_2017_val() -> None:
    rows = read_shape_table()
    assert len(rows) == 30
    assert sum(row.frames for row in rows) == 1999
    assert sum(row.objects for row in rows) == 61
    assert {(row.width, row.height) for row in rows} == {(854, 480), (910, 480), (1152, 480)}


def test_packaged_shape_table_is_a_copy_of_the_reference() -> None:
    reference = REFERENCE_TABLE
    if not reference.is_file():
        pytest.skip(f"{reference} is not present (only developer machines have ../shared)")
    assert DEFAULT_SHAPE_TABLE.read_text() == reference.read_text()


def test_shape_table_with_a_bad_header_is_rejected(tmp_path: Path) -> None:
    table = tmp_path / "shape.tsv"
    table.write_text("name\tframes\nblackswan\t50\n")
    with pytest.raises(DataError, match="shape.tsv"):
        read_shape_table(table)


def test_generator_writes_a_dataset_of_the_requested_shape(tmp_path: Path) -> None:
    generated = generate_shaped_dataset(tmp_path / "gen", TINY, seed=3)
    dataset = open_dataset(generated.root, "val")
    assert [s.name for s in dataset.sequences] == ["walk", "jump", "swim"]
    differs = False
    for row, sequence in zip(TINY, dataset.sequences, strict=True):
        assert len(sequence.frames) == row.frames
        assert sequence.fully_annotated
        assert {image_size(path) for path in sequence.frames} == {(row.width, row.height)}
        assert int(sequence.first_mask().max()) == row.objects  # K of the official evaluation
        for name in sequence.frame_names:
            prediction = read_mask(generated.predictions / row.name / f"{name}.png")
            assert prediction.shape == (row.height, row.width)
            assert int(prediction.max()) <= row.objects
            differs |= not np.array_equal(prediction, sequence.load_mask(name))
    assert differs  # predictions are perturbed ground truth, not a copy
    result = evaluate_dataset(dataset, generated.predictions, progress=False)
    assert len(result.objects) == 6
    assert 0.0 < result.global_metrics["J-Mean"] < 1.0

    # Same arguments: the files are reused, not rewritten.
    mask = generated.root / "Annotations" / "480p" / "walk" / "00000.png"
    before = mask.stat().st_mtime_ns
    assert generate_shaped_dataset(tmp_path / "gen", TINY, seed=3) == generated
    assert mask.stat().st_mtime_ns == before


def test_generator_starts_again_for_other_arguments_or_an_interrupted_run(tmp_path: Path) -> None:
    rows = TINY[:1]
    generated = generate_shaped_dataset(tmp_path, rows, seed=1)
    mask = generated.root / "Annotations" / "480p" / "walk" / "00003.png"
    first = read_mask(mask)
    generate_shaped_dataset(tmp_path, rows, seed=2)
    assert not np.array_equal(read_mask(mask), first)  # other seed, other blobs
    (tmp_path / ".generated.json").write_text('{"complete": false}')  # as left by an interrupted run
    mask.unlink()
    generate_shaped_dataset(tmp_path, rows, seed=1)
    np.testing.assert_array_equal(read_mask(mask), first)  # same seed, same bytes again


def test_generator_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        generate_shaped_dataset(tmp_path, TINY)


def test_benchmark_script_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "tiny.tsv"
    table.write_text(
        "sequence\tframes\tobjects\twidth\theight\n"
        + "".join(f"{r.name}\t{r.frames}\t{r.objects}\t{r.width}\t{r.height}\n" for r in TINY)
    )
    out = tmp_path / "out"
    arguments = ["--out", str(out), "--work-dir", str(tmp_path / "work"), "--repeats", "1"]
    code = main([*arguments, "--shape-table", str(table)])
    assert code == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["dataset"]["frames"] == 15
    assert report["dataset"]["objects"] == 6
    ours = report["harness.evaluation"]
    assert len(ours["seconds"]) == 1 and ours["median_seconds"] > 0
    assert ours["traced_peak_mb"] > 0
    assert set(ours["global"]) >= {"J&F-Mean", "J-Mean", "F-Mean"}
    printed = capsys.readouterr().out
    assert "harness.evaluation" in printed
    if "vos_benchmark" in report:  # installed with the dev extra; the numbers must agree
        assert "speed-up over vos_benchmark" in printed
        for key, difference in report["abs_difference_vs_vos_benchmark"].items():
            assert difference < 1e-9, key
