"""Shared test fixtures: the real sample data (skipped with a reason when absent, a failure under
``MEDSAM2_REQUIRE_DATA=1``), a tiny ingested Kvasir work dir, and a tiny-config factory (hiera_t at 64 px on CPU)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from medsam2.config import ExperimentCfg, load_config

REPO = Path(__file__).resolve().parents[1]
REQUIRE_ENV = "MEDSAM2_REQUIRE_DATA"
#: how to get the sample data, for skip and failure messages
GET_SAMPLE_DATA = ("set MEDSAM2_SAMPLE_DATA to the shared sample-data folder (default ../shared/data next to the "
                   "checkout; its README lists the public sources of every folder)")


def required() -> bool:
    """``MEDSAM2_REQUIRE_DATA=1`` (set by ``make test`` and ``.ci/run``): a missing prerequisite fails the test."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def skip_or_fail(missing: str, how: str) -> None:
    """Skip the test because ``missing`` is absent, or fail it under ``MEDSAM2_REQUIRE_DATA=1``; both say ``how``
    to get it."""
    if required():
        pytest.fail(f"{missing}: {how} ({REQUIRE_ENV}=1 makes this a failure; unset it to skip instead)",
                    pytrace=False)
    pytest.skip(f"{missing}: {how}")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), e.g. the raylet and Ray workers that a sweep's
    driver started: they run in their own process groups, so a ``killpg`` of the driver does not reach them."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        c, p = map(int, line.split())
        children.setdefault(p, []).append(c)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def crash(pid: int, timeout_s: float = 30) -> list[int]:
    """SIGKILL ``pid`` and every process below it at once, as a machine crash would, and wait until all are gone
    (reaped or zombies). Returns the pids killed."""
    import signal
    import time

    victims = [pid, *descendants(pid)]
    for v in victims:
        try:
            os.kill(v, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        alive = [v for v in victims if _alive(v)]
        if not alive:
            break
        time.sleep(0.2)
    return victims


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def sample_root() -> Path | None:
    p = Path(os.environ.get("MEDSAM2_SAMPLE_DATA", REPO.parent / "shared" / "data"))
    return p if p.is_dir() else None


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


def remove_checkpoints(root: Path) -> int:
    """Delete every checkpoint file under ``root`` (what a module/session fixture trained: ≈ 0.16–0.56 GB per
    run) and return how many; logs, manifests and reports stay for a post-mortem. ``tmp_path_factory`` dirs are
    not removed at teardown like a passing test's ``tmp_path``, so fixtures that train call this."""
    n = 0
    for p in Path(root).rglob("*"):
        if p.suffix in CHECKPOINT_SUFFIXES and (p.is_file() or p.is_symlink()):
            p.unlink()
            n += 1
    return n


@pytest.fixture(scope="session", autouse=True)
def private_medsam2_home(tmp_path_factory):
    """The whole suite, and every subprocess a test starts, runs with a temporary ``MEDSAM2_HOME`` instead of the
    one ``scripts/env.sh`` / ``.ci/run`` export (inside the checkout): SQLite MLflow stores, the weights cache and
    ``ray_results`` of tests that set no home of their own go there and are removed at the end of the session.
    Tests that need a private home (``tracking_env``, the flow stack) still set their own."""
    home = tmp_path_factory.mktemp("medsam2-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDSAM2_HOME", str(home))
    yield home
    mp.undo()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def sample_data() -> Path:
    root = sample_root()
    if root is None:
        skip_or_fail("real sample data not found", GET_SAMPLE_DATA)
    return root


def copy_kvasir_subset(dest: Path, n_train: int = 6, n_val: int = 2, n_test: int = 3) -> Path:
    """Copy real Kvasir pairs to ``dest``: train/val stems picked by their patient split bucket (so the split
    is known in advance) and test stems from the frozen PraNet list (written as the source's test list)."""
    from medsam2.data.splits import DEFAULT_VAL_FRACTION, split_bucket

    src = sample_root() / "kvasir-seg"
    other = (src / "split_other.txt").read_text().split()
    cut = round(DEFAULT_VAL_FRACTION * 1000)
    val = [s for s in other if split_bucket(f"kvasir-seg:{s}") < cut][:n_val]
    train = [s for s in other if split_bucket(f"kvasir-seg:{s}") >= cut][:n_train]
    test = (src / "split_pranet_test.txt").read_text().split()[:n_test]
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    for stem in train + val + test:
        shutil.copy(src / "images" / f"{stem}.jpg", dest / "images")
        shutil.copy(src / "masks" / f"{stem}.jpg", dest / "masks")
    (dest / "split_pranet_test.txt").write_text("\n".join(test) + "\n")
    return dest


@pytest.fixture(scope="session")
def kvasir_workdir(sample_data, tmp_path_factory) -> Path:
    """An ingested work dir with 6 train, 2 val and 3 test real Kvasir images (shared, treat as read-only)."""
    from medsam2.data.ingest import ingest

    root = tmp_path_factory.mktemp("kvasir")
    copy_kvasir_subset(root / "kvasir-seg")
    ingest(str(root / "kvasir-seg"), root / "work")
    return root / "work"


def tiny_cfg(workdir: Path, out: Path, *overrides: str) -> ExperimentCfg:
    """hiera_t at 64 px, batch 2, 3 steps, fp32 CPU, no progress bar; extra dotted overrides win."""
    return load_config(overrides=[
        f"data.workdir={workdir}", f"train.output_dir={out}", "model.image_size=64", "train.max_steps=3",
        "train.batch_size=2", "train.warmup_steps=1", "train.eval_every=3", "train.checkpoint_every=1",
        "train.progress=false", "train.device=cpu", "data.augment=none", *overrides,
    ])


@pytest.fixture
def tracking_env(tmp_path, monkeypatch) -> Path:
    """A private MEDSAM2_HOME + SQLite MLflow store for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("MEDSAM2_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home
