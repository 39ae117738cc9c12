"""``metagrad plot`` of a comparison decides whether to draw fits.png from the task's registered class, reading no
data set: an Omniglot or image comparison redraws without its data."""

from __future__ import annotations

from pathlib import Path

from metagrad.compare import redraw_fits, run_name
from metagrad.presets import preset
from metagrad.run import init_run_record


def test_fits_of_an_image_comparison_read_no_data(tmp_path: Path) -> None:
    cfg = preset("maml", "tiny", "omniglot")
    cfg.task.data = str(tmp_path / "gone")  # the data set is not here (moved, or another machine)
    (tmp_path / run_name("maml")).mkdir()
    init_run_record(tmp_path / run_name("maml"), cfg)
    assert redraw_fits(tmp_path, ["maml"]) is None  # Omniglot draws no curves: no fits.png, and no DataError
    assert not (tmp_path / "fits.png").exists()
