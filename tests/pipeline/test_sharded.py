"""Sharded builds on a local Ray (2 CPUs, the tiny model): the same tables as one process, resume
with only the unfinished shard, and a one-line error without Ray."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from app.engine.sae import SAE
from app.engine.tiny import build_tiny
from app.pipeline.precompute import BuildOptions, build
from app.pipeline.sharded import INSTALL_HINT, shard_bounds
from tests.factories import tiny_topk_sae, word_corpus
from tests.pipeline.test_precompute import dump_tables

CTX, BATCH, N_SEQ, D_SAE = 32, 4, 40, 96
HOOK = "blocks.2.hook_resid_post"
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed: pip install "
                               "'saescope[distributed]' runs these tests")


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module: 2 CPUs, as on the reference machine."""
    from app.pipeline.sharded import connect, require_ray

    assert connect(num_cpus=2)
    yield
    require_ray().shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    words = ["the", "quick", "brown", "fox", ";", "def", "add", "(", "a", ",", "b", ")", ":",
             "return", "+", "class", "0", "1", "2", "10", "python"]
    corpus = word_corpus(root / "docs", words)
    tiny_topk_sae(root / "sae", d_sae=D_SAE, k=10, context_size=CTX, hook=HOOK, spread_bias=True)
    opts = BuildOptions(sae_path=root / "sae", corpus=str(corpus), n_tokens=N_SEQ * CTX,
                        batch_size=BATCH, window_len=12, n_top=6, n_bands=5, per_band=2,
                        eval_tokens=2 * CTX, progress=False,
                        db_url=f"sqlite:///{root / 'one.db'}", cache_dir=root / "cache-one")
    lm, sae = build_tiny("tiny-llama"), SAE.load(root / "sae")
    build(opts, lm=lm, sae=sae, log=lambda m: None)  # the one-process reference
    return root, lm, sae, opts, dump_tables(root / "one.db")


def test_shards_are_whole_batches_covering_every_sequence():
    assert shard_bounds(40, 2, 4) == [(0, 20), (20, 40)]
    assert shard_bounds(41, 3, 4) == [(0, 16), (16, 28), (28, 41)]
    assert shard_bounds(5, 8, 4) == [(0, 4), (4, 5)]  # no more shards than batches
    for n_seq, n, bs in ((97, 5, 8), (10, 1, 3), (64, 7, 16)):
        bounds = shard_bounds(n_seq, n, bs)
        assert bounds[0][0] == 0 and bounds[-1][1] == n_seq
        assert all(a % bs == 0 and a < b for a, b in bounds)
        assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:], strict=False))


@pytest.mark.distributed
@needs_ray
@pytest.mark.usefixtures("ray_session")
def test_two_shards_on_ray_write_the_tables_of_one_process(setup, tmp_path):
    root, lm, sae, opts, want = setup
    sharded = replace(opts, shards=2, db_url=f"sqlite:///{tmp_path / 'two.db'}",
                      cache_dir=tmp_path / "cache")
    lines: list[str] = []
    result = build(sharded, lm=lm, sae=sae, log=lines.append)
    assert result.shards_total == 2 and sorted(result.shards_run) == [0, 1]
    assert any("2 of 2 shards on Ray" in line for line in lines), lines
    got = dump_tables(tmp_path / "two.db")
    for table in want:
        assert len(want[table]) > 0, table
        assert got[table] == want[table], table
    assert not any((tmp_path / "cache" / "precompute").iterdir())  # shard states removed


@pytest.mark.distributed
@needs_ray
@pytest.mark.usefixtures("ray_session")
def test_a_rerun_computes_only_the_unfinished_shard(setup, tmp_path):
    root, lm, sae, opts, want = setup
    sharded = replace(opts, shards=2, db_url=f"sqlite:///{tmp_path / 'resumed.db'}",
                      cache_dir=tmp_path / "cache")
    first = build(sharded, lm=lm, sae=sae, log=lambda m: None, stop_after_shards=1)
    assert first.run_id is None and len(first.shards_run) == 1  # stopped as a kill would
    kept = sorted((tmp_path / "cache" / "precompute").glob("*/shards/*.npz"))
    assert [p.name for p in kept] == [f"{first.shards_run[0]}-of-2.npz"]
    lines: list[str] = []
    again = build(sharded, lm=lm, sae=sae, log=lines.append)
    assert again.shards_run == [1 - first.shards_run[0]]  # only the other shard ran
    assert any("resuming: 1 of 2 shards" in line for line in lines), lines
    got = dump_tables(tmp_path / "resumed.db")
    for table in want:
        assert got[table] == want[table], table


def test_shards_without_ray_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    from app.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    monkeypatch.setenv("SAESCOPE_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["build", "--sae", str(tmp_path / "sae"), "--shards", "2",
                                      "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {INSTALL_HINT}"]
    assert "pip install 'saescope[distributed]'" in INSTALL_HINT
