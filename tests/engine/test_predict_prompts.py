"""Per-image prompts for ``medsam2 predict`` (issue 14): a CSV/JSON prompt file or a manifest's boxes, one
output per input, a failing input reported in the JSON without stopping the batch, exit 0 unless all failed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from medsam2.cli import app
from medsam2.engine.prompt_sources import from_prompt_file

runner = CliRunner()


def _png(path: Path, hw: tuple[int, int], value: int = 120) -> Path:
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(path)
    return path


def _json_lines(res) -> list[dict]:
    return [json.loads(line) for line in res.stdout.strip().splitlines() if line.startswith("{")]


def _invoke(*args: str):
    return runner.invoke(app, ["predict", *args, "--json"])


def test_prompt_file_parsing(tmp_path):
    (tmp_path / "imgs").mkdir()
    csv = tmp_path / "p.csv"
    csv.write_text("image,box,points,labels,id\n"
                   "imgs/a.png,\"1,2,30,40\",,,\n"
                   "imgs/b.png,,\"5,6;7,8,0\",1;1,bee\n"
                   "imgs/c.png,\"1,2,three\",,,\n"
                   ",\"1,2,3,4\",,,\n")
    a, b, c, d = from_prompt_file(csv)
    assert a.path == tmp_path / "imgs/a.png" and a.box.tolist() == [1, 2, 30, 40] and a.error is None
    assert b.name == "bee" and b.points.tolist() == [[5, 6], [7, 8]] and b.labels.tolist() == [1, 1]
    assert "box must be x0,y0,x1,y1" in c.error and "line 4" in c.error
    assert "no image" in d.error
    corners = tmp_path / "q.csv"
    corners.write_text("image,x0,y0,x1,y1\na.png,1,2,3,4\n")
    assert from_prompt_file(corners)[0].box.tolist() == [1, 2, 3, 4]
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"a.png": [1, 2, 3, 4], "b.png": {"points": [[1, 1]], "labels": [0]}}))
    ja, jb = from_prompt_file(js)
    assert ja.box.tolist() == [1, 2, 3, 4] and jb.labels.tolist() == [0]


def test_prompt_file_mistakes_are_usage_errors(tmp_path, tiny_checkpoint):
    img = _png(tmp_path / "a.png", (40, 40))
    bad = tmp_path / "p.csv"
    bad.write_text(f"image,bbox\n{img},\"1,2,3,4\"\n")
    res = _invoke("--prompts", str(bad), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "did you mean 'box'" in res.stderr, res.output
    assert _json_lines(res)[-1]["kind"] == "usage"
    no_image = tmp_path / "n.csv"
    no_image.write_text("path,box\nx.png,\"1,2,3,4\"\n")
    assert _invoke("--prompts", str(no_image), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o")
                   ).exit_code == 2
    for args in (["--prompts", str(bad), "--box", "1,2,3,4"], ["--id", "x"], [], [str(img), "--box", "1,2"]):
        res = _invoke(*args, "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"))
        assert res.exit_code == 2 and "Traceback" not in res.stderr, (args, res.output)


def test_one_output_per_input_and_failures_do_not_stop_the_batch(tmp_path, tiny_checkpoint):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _png(imgs / "small.png", (40, 60), 1)
    _png(imgs / "big.png", (90, 70), 2)
    (imgs / "broken.png").write_bytes(b"not a png at all")
    _png(imgs / "nobox.png", (30, 30), 3)
    _png(imgs / "outside.png", (30, 30), 4)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("image,box\n"
                       "imgs/small.png,\"5,5,30,25\"\n"
                       "imgs/broken.png,\"1,1,10,10\"\n"
                       "imgs/nobox.png,\n"
                       "imgs/missing.png,\"1,1,10,10\"\n"
                       "imgs/outside.png,\"100,100,120,120\"\n"
                       "imgs/big.png,\"10,20,60,80\"\n")
    res = _invoke("--prompts", str(prompts), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    out = _json_lines(res)[-1]
    assert out["n_inputs"] == 6 and out["n_ok"] == 2 and out["n_failed"] == 4
    status = {Path(o["input"]).name: o for o in out["outputs"]}
    assert [Path(o["input"]).name for o in out["outputs"]] == ["small.png", "broken.png", "nobox.png",
                                                                "missing.png", "outside.png", "big.png"]
    for name, hw, box in (("small.png", (40, 60), [5, 5, 30, 25]), ("big.png", (90, 70), [10, 20, 60, 80])):
        o = status[name]
        assert o["status"] == "ok" and o["box"] == box
        assert np.array(Image.open(o["mask_png"])).shape == hw
    assert "no box" in status["nobox.png"]["error"]
    assert "not found" in status["missing.png"]["error"]
    assert "outside" in status["outside.png"]["error"]
    assert status["broken.png"]["status"] == "failed" and status["broken.png"]["error"]
    assert all(o["kind"] == "input" for o in out["outputs"] if o["status"] == "failed")

    # the images named on the command line, each with its own row; an image without a row fails alone
    res = _invoke(str(imgs / "big.png"), str(imgs / "nobox.png"), str(tmp_path / "other.png"),
                  "--prompts", str(prompts), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out2"))
    out = _json_lines(res)[-1]
    assert res.exit_code == 0 and [o["status"] for o in out["outputs"]] == ["ok", "failed", "failed"]
    assert "no row" in out["outputs"][2]["error"]


def test_every_input_failing_exits_non_zero_with_the_summary_before_the_error(tmp_path, tiny_checkpoint):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"image": "gone.png", "box": [1, 1, 5, 5]}, {"image": "gone2.png"}]))
    res = _invoke("--prompts", str(prompts), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"))
    assert res.exit_code == 3, res.output
    *_, summary, error = _json_lines(res)
    assert summary["n_ok"] == 0 and len(summary["outputs"]) == 2
    assert set(error) == {"error", "kind", "hint"} and "every input failed" in error["error"]
    assert "Traceback" not in res.stderr


def test_manifest_boxes(tmp_path, tiny_checkpoint):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i, hw in enumerate(((48, 64), (64, 40))):
        _png(src / "images" / f"case{i}.png", hw, i)
        mask = np.zeros(hw, np.uint8)
        mask[10:30, 8:30] = 255
        Image.fromarray(mask).save(src / "masks" / f"case{i}.png")
    wd = tmp_path / "work"
    ing = runner.invoke(app, ["ingest", str(src), "--workdir", str(wd), "--json"])
    assert ing.exit_code == 0, ing.output
    from medsam2.data.manifest import read_manifest

    ids = list(read_manifest(wd)["image_id"])
    assert len(ids) == 2
    res = _invoke("--workdir", str(wd), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"))
    out = _json_lines(res)[-1]
    assert res.exit_code == 0 and out["n_ok"] == 2, res.output
    assert sorted(o["input"] for o in out["outputs"]) == sorted(ids)
    assert all(o["box"] == [8.0, 10.0, 30.0, 30.0] for o in out["outputs"])
    res = _invoke("--workdir", str(wd), "--id", ids[1], "--id", "no-such-id", "--model", str(tiny_checkpoint),
                  "--out", str(tmp_path / "o2"))
    out = _json_lines(res)[-1]
    assert res.exit_code == 0 and [o["status"] for o in out["outputs"]] == ["ok", "failed"]
    assert "not in the manifest" in out["outputs"][1]["error"]
    res = _invoke("--workdir", str(tmp_path / "empty"), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"))
    assert res.exit_code == 3 and "ingest" in res.stderr
