"""The report gallery's titles do not overlap (issue 14): long image ids are shortened, the Dice goes on its
own line, and the figure lays itself out (constrained layout)."""

from __future__ import annotations

import itertools

import numpy as np

from medsam2.eval import report


def _items(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        target = np.zeros((48, 64), bool)
        target[10:30, 12:40] = True
        out.append({"image_id": f"kvasir-seg/images/cju{i}qkwl35piu0993l0dewei2-very-long-frame-name-{i:04d}",
                    "dice": float(rng.uniform()), "image": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
                    "target": target, "pred": np.roll(target, i, axis=1)})
    return out


def test_short_title():
    assert report.short_title("a/b/case1", 0.5) == "case1\nDice 0.500"
    t = report.short_title("x" * 10 + "y" * 40, 0.25)
    first = t.splitlines()[0]
    assert len(first) == report.TITLE_CHARS and "…" in first and first.startswith("x") and first.endswith("y")


def test_gallery_titles_do_not_overlap(tmp_path, monkeypatch):
    figs = []
    save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: figs.append(fig) or save(fig, path))
    report._plot_gallery(_items(8), tmp_path / "gallery.png")
    (fig,) = figs
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    titles = [ax.title.get_window_extent(renderer) for ax in fig.axes]
    assert len(titles) == 8
    for a, b in itertools.combinations(titles, 2):
        assert not a.overlaps(b), (a, b)
    boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
    for t, (i, b) in itertools.product(titles, enumerate(boxes)):  # no title runs into another image
        if t is not titles[i]:
            assert not t.overlaps(b), (t, b)
