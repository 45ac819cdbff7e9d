"""Precompute on tiny-llama with a random SAE: brute-force exactness, static features, kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine.sae import SAE
from app.engine.tiny import build_tiny
from app.pipeline.activation_stats import default_hist_edges
from app.pipeline.precompute import BuildOptions, compute_records
from app.pipeline.static_features import decoder_neighbours, logit_effects
from app.records import WINDOW_KIND_INTERVAL, WINDOW_KIND_TOP, band_edge_values
from tests.factories import tiny_topk_sae, word_corpus

REPO = Path(__file__).resolve().parents[2]
CTX, BATCH, N_SEQ, D_SAE, WIN = 32, 4, 40, 96, 12
HOOK = "blocks.2.hook_resid_post"
WORDS = " ".join([
    "the quick brown fox jumps over a lazy dog ; def add ( a , b ) : return a + b class",
    "Counter model feature sparse layer token print range 0 1 2 3 10 100 python"]).split(" ")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    corpus = word_corpus(root / "docs", WORDS)  # varied lengths: packing and boundaries occur
    tiny_topk_sae(root / "sae", d_sae=D_SAE, k=10, context_size=CTX, hook=HOOK, spread_bias=True)
    sae = SAE.load(root / "sae")
    lm = build_tiny("tiny-llama")
    opts = BuildOptions(sae_path=root / "sae", corpus=str(corpus), n_tokens=N_SEQ * CTX,
                        batch_size=BATCH, window_len=WIN, n_top=6, n_bands=5, per_band=2,
                        eval_tokens=2 * CTX, checkpoint_every=2, progress=False,
                        db_url=f"sqlite:///{root / 'main.db'}", cache_dir=root / "cache")
    return root, lm, sae, opts


@pytest.fixture(scope="module")
def computed(setup):
    root, lm, sae, opts = setup
    records, result = compute_records(opts, lm=lm, sae=sae, log=lambda m: None)
    assert records is not None and result.resumed_at_seq == 0
    return records


def dense_activations(lm, sae, tokens, special):
    """The whole [n_seq, ctx, d_sae] matrix, batch by batch as the pipeline batches the model."""
    out = []
    with torch.no_grad():
        for s in range(0, len(tokens), BATCH):
            ids = torch.from_numpy(tokens[s:s + BATCH]).long()
            x = lm.run_to_hook(ids, HOOK).to(torch.float16).float()
            out.append(sae.encode(x).numpy())
    acts = np.concatenate(out)
    acts[special] = 0.0
    return acts


def test_top_windows_and_stats_equal_brute_force(setup, computed):
    _, lm, sae, opts = setup
    seqs, feats, w = computed.sequences, computed.features, computed.windows
    from app.pipeline.corpus import load_corpus

    corpus = load_corpus(opts.corpus, lm=lm, context_size=CTX, max_tokens=N_SEQ * CTX)
    assert np.array_equal(seqs.tokens, corpus.tokens[seqs.seq_index])
    acts = dense_activations(lm, sae, corpus.tokens, corpus.special_mask)
    counted = acts[~corpus.special_mask]
    assert computed.run.n_tokens == corpus.n_seq * CTX  # positions, BOS included
    assert corpus.real_tokens() <= N_SEQ * CTX < corpus.real_tokens() + CTX  # the budget is text
    assert computed.run.n_tokens_counted == counted.shape[0]
    assert np.array_equal(feats.max_act, counted.max(0))
    assert np.array_equal(feats.count, (counted > 0).sum(0))
    np.testing.assert_allclose(feats.act_sum, counted.astype(np.float64).sum(0), rtol=1e-12)
    edges = default_hist_edges()
    for f in range(D_SAE):
        v = counted[:, f][counted[:, f] > 0]
        want = np.histogram(np.clip(v, edges[0], np.nextafter(edges[-1], 0)), bins=edges)[0]
        assert np.array_equal(feats.hist_counts[f], want)

    top = w.kind == WINDOW_KIND_TOP
    n_checked = 0
    for f in range(D_SAE):
        cands = []
        for s in range(corpus.n_seq):
            col = acts[s, :, f]
            if col.max() > 0:
                p = int(np.argmax(col))
                cands.append((-float(col[p]), s * CTX + p, s, p))
        want = sorted(cands)[:opts.n_top]
        mine = np.flatnonzero(top & (w.feature == f))
        mine = mine[np.argsort(w.rank[mine])]
        assert len(mine) == len(want)
        for i, (negv, _, s, p) in zip(mine, want, strict=True):
            start = max(0, p - WIN // 2)
            length = min(CTX, p - WIN // 2 + WIN) - start
            assert (w.seq_index[i], w.start[i], w.length[i]) == (s, start, length)
            assert w.max_value[i] == -negv and w.start[i] + w.max_pos[i] == p
            vals = np.zeros(WIN, np.float16)
            vals[:length] = acts[s, start:start + length, f]
            assert np.array_equal(w.values[i], vals)
            n_checked += 1
    assert n_checked > D_SAE  # most features fire in several sequences

    # interval samples: inside their band, at a real activation, window values exact
    iv = np.flatnonzero(w.kind == WINDOW_KIND_INTERVAL)
    assert iv.size > 0
    for i in iv:
        f, s = w.feature[i], w.seq_index[i]
        m = float(feats.max_act[f])
        e = np.frexp(np.float32(m))[1]
        grid = 2.0 ** e / 128
        band_edges = [0.0] + [np.floor(j * (m / grid) / opts.n_bands + 0.5) * grid
                              for j in range(1, opts.n_bands)] + [np.inf]
        # the edges the explorer shows are these
        assert band_edge_values(m, n_bands=opts.n_bands)[:-1] == band_edges[:-1]
        window = acts[s, w.start[i]:w.start[i] + w.length[i], f]
        assert np.array_equal(w.values[i][:w.length[i]], window.astype(np.float16))
        in_band = (window >= band_edges[w.band[i]]) & (window < band_edges[w.band[i] + 1])
        assert in_band.any()
    for f in range(D_SAE):
        v = counted[:, f][counted[:, f] > 0].astype(np.float64)
        m = float(feats.max_act[f])
        e = np.frexp(np.float32(m))[1]
        grid = 2.0 ** e / 128
        inner = np.floor(np.arange(1, opts.n_bands) * (m / grid) / opts.n_bands + 0.5) * grid
        band = (v[:, None] >= inner[None, :]).sum(1)
        assert np.array_equal(feats.band_count[f], np.bincount(band, minlength=opts.n_bands))


def _contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def test_packed_build_records_every_document_of_each_sequence(setup, computed, tmp_path):
    """Each stored sequence lists every document it holds at the offsets the packing put them:
    checked against the documents' own tokens, then through the store to the windows."""
    root, lm, _, opts = setup
    from app.store.db import make_engine, read_session, upgrade
    from app.store.queries import get_feature
    from app.store.writer import write_run

    seqs = computed.sequences
    bos = lm.bos_token_id
    names = seqs.doc_names
    text_ids = {name: lm.tokenizer((Path(opts.corpus) / name).read_text(),
                                   add_special_tokens=False)["input_ids"] for name in names}
    n_packed = 0
    for row in range(len(seqs.seq_index)):
        starts = seqs.doc_starts[row].tolist()
        tokens = seqs.tokens[row].tolist()
        assert starts[0] == [0, seqs.doc_index[row]] and tokens[0] == bos
        bounds = [offset for offset, _ in starts] + [CTX]
        for k, (offset, doc) in enumerate(starts):
            # A document opens at its BOS; the text up to the next start is its own, in order:
            # from its first token when it starts here, else a stretch of its middle.
            assert tokens[offset] == bos
            text = tokens[offset + 1:bounds[k + 1]]
            assert bos not in text
            whole = text_ids[names[doc]]
            if k > 0:
                assert text == whole[:len(text)]
            else:
                assert _contains(whole, text)
            if k > 0:
                assert doc == starts[k - 1][1] + 1  # documents follow in corpus order
        n_packed += len(starts) > 1
    assert n_packed > 0  # the corpus's short documents share sequences

    # The store keeps them, and each window names the documents it shows.
    url = f"sqlite:///{tmp_path / 'packed.db'}"
    upgrade(url)
    engine = make_engine(url)
    crossing = 0
    try:
        write_run(engine_or_session=engine, **computed.as_kwargs())
        row_of = {int(s): i for i, s in enumerate(seqs.seq_index)}
        with read_session(engine) as session:
            for f in range(0, D_SAE, 7):
                for w in get_feature(session=session, sae_id=computed.sae.sae_id,
                                     index=f).windows:
                    starts = seqs.doc_starts[row_of[w.seq_index]].tolist()
                    in_force = [d for o, d in starts if o <= w.start][-1]
                    inside = [(o - w.start, d) for o, d in starts
                              if w.start < o < w.start + len(w.token_ids)]
                    assert [(d.offset, d.doc_index, d.name) for d in w.documents] == [
                        (o, d, names[d]) for o, d in [(0, in_force), *inside]]
                    assert all(w.token_ids[o] == bos for o, _ in inside)
                    crossing += bool(inside)
    finally:
        engine.dispose()
    assert crossing > 0


def test_static_features_equal_a_dense_computation(setup, computed):
    _, lm, sae, opts = setup
    w_u, scale = lm.unembedding()
    w_dec = sae.W_dec.detach().float()
    effects = (w_dec * scale.float()) @ w_u.float()
    feats = computed.features
    order = torch.argsort(effects, dim=1, descending=True)
    np.testing.assert_allclose(feats.logit_pos_values, effects.gather(1, order[:, :10]).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats.logit_neg_values,
                               effects.gather(1, order.flip(1)[:, :10]).numpy(),
                               rtol=1e-5, atol=1e-6)
    picked = effects.gather(1, torch.from_numpy(feats.logit_pos_ids).long())
    np.testing.assert_allclose(picked.numpy(), feats.logit_pos_values, rtol=1e-5, atol=1e-6)
    unit = w_dec / w_dec.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    cos.fill_diagonal_(-2.0)
    want = cos.sort(dim=1, descending=True).values[:, :10].numpy()
    np.testing.assert_allclose(feats.neighbour_cos, want, rtol=1e-5, atol=1e-6)
    assert not (feats.neighbour_idx == np.arange(D_SAE)[:, None]).any()
    # chunked (a few features at a time) equals one chunk
    small = logit_effects(w_dec=w_dec, norm_scale=scale, w_u=w_u, n=10, budget_elems=1000)
    assert np.array_equal(small.pos_ids, feats.logit_pos_ids)
    np.testing.assert_allclose(small.neg_values, feats.logit_neg_values, rtol=1e-6)
    idx, cs = decoder_neighbours(w_dec, n=10, budget_elems=300)
    assert np.array_equal(idx, feats.neighbour_idx)
    np.testing.assert_allclose(cs, feats.neighbour_cos, rtol=1e-6)


def test_in_process_resume_gives_identical_records(setup, computed, tmp_path):
    _, lm, sae, opts = setup
    opts2 = replace(opts, cache_dir=tmp_path / "cache")
    part, result = compute_records(opts2, lm=lm, sae=sae, log=lambda m: None,
                                   stop_after_batches=3)
    assert part is None and result.resumed_at_seq == 0
    again, result = compute_records(opts2, lm=lm, sae=sae, log=lambda m: None)
    assert result.resumed_at_seq == 2 * BATCH  # the checkpoint after batch 2
    for name in computed.features.__dataclass_fields__:
        assert np.array_equal(getattr(again.features, name), getattr(computed.features, name))
    for name in computed.windows.__dataclass_fields__:
        assert np.array_equal(getattr(again.windows, name), getattr(computed.windows, name))
    assert again.run.sae_stats == computed.run.sae_stats


# ----------------------------------------------------------------------------- kill -9 and resume

DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    args = json.loads(sys.argv[1])
    point, nth = args["kill"].split(":") if args["kill"] else (None, "0")
    nth = int(nth)
    calls = {"n": 0}

    def die_on_nth(fn, *, before):
        def wrapped(*a, **k):
            calls["n"] += 1
            if before and calls["n"] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*a, **k)
            if not before and calls["n"] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped

    import app.pipeline.accumulators as acc
    import app.pipeline.checkpoint as ck
    import app.pipeline.precompute as pc
    import app.store.writer as writer
    if point == "after_checkpoint":
        ck.Checkpoint.save = die_on_nth(ck.Checkpoint.save, before=False)
    elif point == "mid_batch":
        acc.FeatureAccumulators.feed = die_on_nth(acc.FeatureAccumulators.feed, before=False)
    elif point == "checkpoint_rename":  # the tmp file is written, the rename never happens
        ck.os.replace = die_on_nth(os.replace, before=True)
    elif point == "mid_write":  # inside the DB transaction, after some rows went in
        writer._bulk_insert = die_on_nth(writer._bulk_insert, before=True)
    opts = pc.BuildOptions(**{**args["opts"], "sae_path": Path(args["opts"]["sae_path"]),
                              "cache_dir": Path(args["opts"]["cache_dir"])})
    pc.build(opts)
""")


def run_build(opts: BuildOptions, kill: str | None, *, tmpdir: Path | None = None
              ) -> subprocess.CompletedProcess:
    fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if tmpdir is not None:  # where the build's static-features worker keeps its files
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run([sys.executable, "-c", DRIVER, json.dumps({"opts": fields,
                                                                      "kill": kill})],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


VOLATILE = {"id", "run_id", "created_at", "updated_at", "active_run_id"}


def dump_tables(db: Path) -> dict[str, list[tuple]]:
    con = sqlite3.connect(db)
    out = {}
    for table in ("models", "saes", "runs", "sequences", "features", "feature_tokens",
                  "windows"):
        cols = [r[1] for r in con.execute(f"PRAGMA table_info({table})")
                if r[1] not in VOLATILE]
        quoted = ", ".join(f'"{c}"' for c in cols)
        rows = con.execute(f"SELECT {quoted} FROM {table} ORDER BY {quoted}").fetchall()
        out[table] = [tuple(zip(cols, r, strict=True)) for r in rows]
    con.close()
    return out


def test_kill_9_at_several_points_then_resume_equals_uninterrupted(setup, tmp_path):
    root, _, _, opts = setup
    killed = replace(opts, db_url=f"sqlite:///{tmp_path / 'killed.db'}",
                     cache_dir=tmp_path / "cache-killed")
    plain = replace(opts, db_url=f"sqlite:///{tmp_path / 'plain.db'}",
                    cache_dir=tmp_path / "cache-plain")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    outputs = []
    for kill in ("after_checkpoint:1", "mid_batch:3", "checkpoint_rename:1", "mid_write:3"):
        proc = run_build(killed, kill, tmpdir=tmpdir)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        outputs.append(proc.stdout)
    assert "resuming" not in outputs[0]
    assert "(sequence 8 of " in outputs[1]
    assert "(sequence 16 of " in outputs[2]
    assert "(sequence 16 of " in outputs[3]
    assert "writing run" in outputs[3]
    final = run_build(killed, None)
    assert final.returncode == 0, final.stderr[-2000:]
    assert re.search(r"\(sequence (\d+) of \1,", final.stdout)  # resumed after the last batch
    assert not any((tmp_path / "cache-killed" / "precompute").iterdir())  # spent checkpoint
    clean = run_build(plain, None)
    assert clean.returncode == 0, clean.stderr[-2000:]
    a, b = dump_tables(tmp_path / "killed.db"), dump_tables(tmp_path / "plain.db")
    for table in a:
        assert len(a[table]) > 0, table
        assert a[table] == b[table], table
    # Each killed build's static-features worker saw its input end and removed its files.
    deadline = time.monotonic() + 60
    while any(tmpdir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(tmpdir.iterdir())


def test_reuses_a_matching_activation_cache(setup, computed, tmp_path):
    _, lm, sae, opts = setup
    from app.pipeline.activations import get_activations

    opts2 = replace(opts, cache_dir=tmp_path / "cache")
    get_activations(lm=lm, hook_name=HOOK, corpus=opts.corpus, max_tokens=opts.n_tokens,
                    context_size=CTX, cache_dir=opts2.cache_dir, progress=False,
                    batch_size=BATCH)
    logs: list[str] = []
    records, _ = compute_records(opts2, lm=lm, sae=sae, log=logs.append)
    assert any("reusing cache" in m for m in logs)
    assert records.run.config["activations"] == "cache"
    # the cache holds the same float16 activations the live path feeds the SAE
    np.testing.assert_allclose(records.features.max_act, computed.features.max_act, rtol=1e-3)
    assert np.array_equal(records.features.count, computed.features.count)
