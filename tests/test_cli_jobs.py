"""Long commands as a user runs them (real subprocesses on tiny-llama): bad outputs and corpora fail
in one line before any model runs, a failed write keeps the finished pass, Ctrl-C before the first
checkpoint saves one and the rerun says where it resumes, the data folder is printed."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.factories import tiny_topk_sae, word_corpus

REPO = Path(__file__).resolve().parents[1]
CTX, D_SAE = 32, 96
HOOK = "blocks.2.hook_resid_post"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", ";", "def", "add",
         "(", "a", ",", "b", ")", ":", "return", "+", "class", "Counter", "model", "feature",
         "sparse", "layer", "token", "print", "range", "0", "1", "2", "10", "python"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-jobs")
    corpus = word_corpus(root / "docs", WORDS, lengths=(50, 400))
    tiny_topk_sae(root / "sae", d_sae=D_SAE, k=10, context_size=CTX, hook=HOOK, spread_bias=True)
    return {"sae": root / "sae", "corpus": corpus}


def build_args(inputs: dict[str, Path], *extra: str) -> list[str]:
    return ["build", "--sae", str(inputs["sae"]), "--model", "tiny-llama", "--corpus",
            str(inputs["corpus"]), "--tokens", str(40 * CTX), "--batch-size", "4",
            "--eval-tokens", str(2 * CTX), *extra]


def saescope(args: list[str], *, cwd: Path, home: Path | None = None, **kw
             ) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("SAESCOPE_HOME", None)
    if home is not None:
        env["SAESCOPE_HOME"] = str(home)
    return subprocess.run([sys.executable, "-c", "from app.cli import app; app()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


def one_error_line(proc: subprocess.CompletedProcess, *, after_progress: bool = False) -> str:
    """The one error line: all of stderr, or (after_progress) the last line after progress bars."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if after_progress:
        lines = [line for line in lines if "|" not in line]  # tqdm bars
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: "), lines
    return lines[0]


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ------------------------------------------------------------------------------------- fail early


@pytest.mark.parametrize(("db", "message"), [
    ("sqlite:////proc/x.db", "cannot write the database sqlite:////proc/x.db"),
    ("nosuch://x", "unknown database backend 'nosuch'"),
])
def test_build_with_an_unwritable_database_fails_before_any_model_runs(inputs, tmp_path, db,
                                                                       message):
    proc = saescope(build_args(inputs, "--db", db), cwd=tmp_path, home=tmp_path / "data")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in one_error_line(proc)
    assert "loading" not in proc.stdout  # neither the SAE nor the model was loaded
    assert all_files(tmp_path) == []  # no state file, no cache, no database


def test_build_with_an_unwritable_data_folder_fails_before_any_model_runs(inputs, tmp_path):
    proc = saescope(build_args(inputs, "--db", f"sqlite:///{tmp_path / 'x.db'}"), cwd=tmp_path,
                    home=Path("/proc/saescope-data"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc)
    assert "/proc/saescope-data/cache" in line and "SAESCOPE_HOME" in line
    assert "loading" not in proc.stdout
    assert all_files(tmp_path) == []


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_a_missing_or_empty_corpus_fails_before_the_model_loads(inputs, tmp_path, kind):
    corpus = tmp_path / "rows.csv"
    if kind == "empty":
        corpus.write_text("text\n\n")
    args = build_args({**inputs, "corpus": corpus}, "--db", f"sqlite:///{tmp_path / 'x.db'}")
    proc = saescope(args, cwd=tmp_path, home=tmp_path / "data")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc)
    assert ("not found" if kind == "missing" else "is empty") in line, line
    assert "loading" not in proc.stdout
    assert all_files(tmp_path) == ([corpus] if kind == "empty" else [])


def test_a_write_that_fails_after_the_pass_keeps_it_for_the_rerun(inputs, tmp_path):
    # A database that passes the early checks, but whose schema no migration knows: the write
    # fails only after the whole pass.
    bad = tmp_path / "bad.db"
    con = sqlite3.connect(bad)
    con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    con.execute("INSERT INTO alembic_version VALUES ('not-a-revision')")
    con.commit()
    con.close()
    home = tmp_path / "data"
    proc = saescope(build_args(inputs, "--db", f"sqlite:///{bad}"), cwd=tmp_path, home=home)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc, after_progress=True)
    assert f"cannot write the run to sqlite:///{bad}" in line
    assert "the same command with a working --db resumes from it" in line
    states = list((home / "cache" / "precompute").glob("*/state.npz"))
    assert len(states) == 1 and str(states[0].parent) in line

    good = tmp_path / "good.db"
    proc = saescope(build_args(inputs, "--db", f"sqlite:///{good}"), cwd=tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"resuming at [\d,]+ of [\d,]+ tokens \(sequence (\d+) of \1,", proc.stdout)
    assert not list((home / "cache" / "precompute").iterdir())  # spent checkpoint removed
    assert proc.stdout.splitlines()[0] == f"data folder: {home} (SAESCOPE_HOME)"

    # Building the same SAE again: the budget rounding and the replaced run are both said.
    args = build_args(inputs, "--db", f"sqlite:///{good}")
    args[args.index("--tokens") + 1] = str(40 * CTX + 20)
    proc = saescope(args, cwd=tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"--tokens {40 * CTX + 20:,} rounded down to [\d,]+: the text of \d+ "
                     rf"whole sequences of {CTX}", proc.stdout), proc.stdout
    assert "replacing run 1 of SAE sae (" in proc.stdout and "its labels are kept" in proc.stdout


# ------------------------------------------------------------------------------- resume honestly

# The real CLI, with a pause after the first batch so the test can press Ctrl-C at a known point
# (long before the first periodic checkpoint, every 20 batches).
PAUSED_CLI = textwrap.dedent("""
    import sys
    import app.pipeline.accumulators as acc
    from app.cli import app
    fed = {"n": 0}
    update = acc.FeatureAccumulators.update_sparse
    def paused(self, *a, **k):
        update(self, *a, **k)
        fed["n"] += 1
        if fed["n"] == 1:
            print("fed one batch", flush=True)
            sys.stdin.readline()  # the test sends SIGINT, then a newline
    acc.FeatureAccumulators.update_sparse = paused
    app(sys.argv[1:])
""")


def test_ctrl_c_before_the_first_checkpoint_saves_one_and_the_rerun_resumes(inputs, tmp_path):
    home = tmp_path / "data"
    args = build_args(inputs, "--db", f"sqlite:///{tmp_path / 'x.db'}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "SAESCOPE_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, *args], cwd=tmp_path, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("fed one batch"):
                break
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("interrupted; saved a checkpoint at "), err[-3000:]
    assert "the same command resumes there" in last
    saved_at = last.removeprefix("interrupted; saved a checkpoint at ").split(" of ")[0]
    assert saved_at != "0"
    assert len(list((home / "cache" / "precompute").glob("*/state.npz"))) == 1

    rerun = saescope(args, cwd=tmp_path, home=home)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming at {saved_at} of " in rerun.stdout and "(sequence 4 of " in rerun.stdout


PAUSED_TRAIN_CLI = textwrap.dedent("""
    import sys
    from app.engine.lm import LanguageModel
    from app.cli import app
    calls = {"n": 0}
    run = LanguageModel.run_to_hook
    def paused(self, *a, **k):
        out = run(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 1:
            print("ran one batch", flush=True)
            sys.stdin.readline()  # the test sends SIGINT, then a newline
        return out
    LanguageModel.run_to_hook = paused
    app(sys.argv[1:])
""")


def test_ctrl_c_while_caching_activations_keeps_them_and_the_rerun_resumes(inputs, tmp_path):
    home = tmp_path / "data"
    args = ["train-sae", "--model", "tiny-llama", "--hook", HOOK, "--d-sae", "64", "--k", "4",
            "--corpus", str(inputs["corpus"]), "--tokens", "2048", "--eval-tokens", "128",
            "--epochs", "1", "--out", str(tmp_path / "sae")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "SAESCOPE_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_TRAIN_CLI, *args], cwd=tmp_path,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("ran one batch"):
                break
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("interrupted; activations for "), err[-3000:]
    assert last.endswith("are cached: the same command resumes there")
    saved_at = last.removeprefix("interrupted; activations for ").split(" of ")[0]

    rerun = saescope(args, cwd=tmp_path, home=home)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"activations: resuming at {saved_at} of " in rerun.stdout
    assert (tmp_path / "sae" / "cfg.json").is_file()
    again = saescope(args, cwd=tmp_path, home=home)  # the cache is complete now: reused, said so
    assert again.returncode == 0, again.stderr[-3000:]
    assert "activations: reusing the cache " in again.stdout


def test_the_data_folder_line_names_the_rule_that_chose_each_folder(tmp_path, monkeypatch):
    from app.cli import data_folder_line
    from app.settings import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAESCOPE_HOME", raising=False)
    monkeypatch.delenv("SAESCOPE_SAES_DIR", raising=False)
    assert data_folder_line(Settings(), saes=True) == (
        f"data folder: {tmp_path / 'data'} (./data of the current folder; SAESCOPE_HOME moves "
        f"it); SAEs: {tmp_path / 'models' / 'saes'} (./models/saes of the current folder; "
        "SAESCOPE_SAES_DIR moves it)")
    monkeypatch.setenv("SAESCOPE_HOME", str(tmp_path / "elsewhere"))
    assert data_folder_line(Settings()) == f"data folder: {tmp_path / 'elsewhere'} (SAESCOPE_HOME)"


# ----------------------------------------------------------------------------- numbers in tokens


def test_a_csv_of_short_rows_is_packed_and_every_figure_counts_text_tokens(inputs, tmp_path):
    from app.engine.tiny import tiny_tokenizer

    rows = tmp_path / "rows.csv"
    texts = [" ".join(WORDS[(i * 7) % 20:(i * 7) % 20 + 3 + i % 5]) for i in range(600)]
    rows.write_text("text\n" + "".join(f"{t}\n" for t in texts))
    tok = tiny_tokenizer()
    assert max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) <= CTX // 2
    home, db = tmp_path / "data", tmp_path / "x.db"
    budget = 40 * CTX
    args = build_args({**inputs, "corpus": rows}, "--db", f"sqlite:///{db}")
    proc = saescope(args, cwd=tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = re.search(r"done: run 1 for SAE sae \(([\d,]+) tokens\)", proc.stdout)
    n_text = int(done.group(1).replace(",", ""))
    assert budget - CTX < n_text <= budget  # the budget is text, not padding
    con = sqlite3.connect(db)
    n_tokens, counted, config = con.execute(
        "SELECT n_tokens, n_tokens_counted, config FROM runs").fetchone()
    con.close()
    assert counted == n_text
    # Positions are text or the BOS opening a row (no padding): short rows add one BOS each.
    n_seq = n_tokens // CTX
    assert n_tokens - counted <= n_seq + n_text // 3
    assert '"packing": "bos-separated-packing"' in config and f'"token_budget": {budget}' in config

    sae = tmp_path / "trained"
    train = ["train-sae", "--model", "tiny-llama", "--hook", HOOK, "--d-sae", "64", "--k", "4",
             "--corpus", str(rows), "--tokens", "3000", "--eval-tokens", "512", "--epochs", "1",
             "--out", str(sae)]
    proc = saescope(train, cwd=tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    cfg = json.loads((sae / "cfg.json").read_text())
    evals = json.loads((sae / "evals.json").read_text())
    trained = cfg["metadata"]["training_tokens"]
    assert 3000 - 128 < trained <= 3000 and evals["train_tokens"] == trained
    assert f"training on {trained:,} tokens" in proc.stdout
    assert 512 - 128 < evals["eval_tokens"] <= 512
    assert f"evaluating on {evals['eval_tokens']:,} held-out tokens" in proc.stdout


def test_train_sae_suggests_a_token_budget_that_works(inputs, tmp_path):
    home = tmp_path / "data"
    args = ["train-sae", "--model", "tiny-llama", "--hook", HOOK, "--d-sae", "64", "--k", "4",
            "--corpus", str(inputs["corpus"]), "--tokens", "1000000", "--eval-tokens", "256",
            "--epochs", "1", "--out", str(tmp_path / "sae")]
    proc = saescope(args, cwd=tmp_path, home=home)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc)
    most = re.search(r"lower --tokens to at most ([\d,]+)", line).group(1).replace(",", "")
    args[args.index("--tokens") + 1] = most
    proc = saescope(args, cwd=tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sae" / "cfg.json").is_file()


def test_build_never_scores_the_sae_on_text_it_was_trained_or_built_over(inputs, tmp_path):
    import json

    home, sae = tmp_path / "data", tmp_path / "trained"
    train = ["train-sae", "--model", "tiny-llama", "--hook", HOOK, "--d-sae", "64", "--k", "4",
             "--corpus", str(inputs["corpus"]), "--tokens", "2048", "--eval-tokens", "256",
             "--epochs", "1", "--out", str(sae)]
    proc = saescope(train, cwd=tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((sae / "cfg.json").read_text())["metadata"]["training_tokens"]

    # A build over fewer tokens than the SAE was trained on evaluates after the training tokens,
    # on train-sae's own held-out slice (so its evals.json is reused).
    db = tmp_path / "x.db"
    build = ["build", "--sae", str(sae), "--corpus", str(inputs["corpus"]), "--tokens", "512",
             "--eval-tokens", "256", "--db", f"sqlite:///{db}"]
    proc = saescope(build, cwd=tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out evals: reusing" in proc.stdout, proc.stdout
    con = sqlite3.connect(db)
    stats = json.loads(con.execute("SELECT sae_stats FROM runs").fetchone()[0])
    con.close()
    assert stats["eval"]["held_out_after_tokens"] == trained
    assert "explained_variance" in stats

    # No text left after the build's tokens: no evaluation at all, and it says why.
    rows = tmp_path / "small.csv"
    rows.write_text("text\n" + "".join(f"{' '.join(WORDS[i % 9:i % 9 + 12])}\n"
                                        for i in range(40)))
    small = ["build", "--sae", str(inputs["sae"]), "--model", "tiny-llama", "--corpus",
             str(rows), "--tokens", "100000", "--eval-tokens", "256", "--db",
             f"sqlite:///{tmp_path / 'small.db'}"]
    proc = saescope(small, cwd=tmp_path, home=home)
    assert proc.returncode == 2 and "lower --tokens to at most" in one_error_line(proc)
    most = int(re.search(r"at most ([\d,]+)", proc.stderr).group(1).replace(",", ""))
    small[small.index("--tokens") + 1] = str(most)
    proc = saescope(small, cwd=tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no evaluation: the corpus has no text after the " in proc.stdout
    con = sqlite3.connect(tmp_path / "small.db")
    stats = json.loads(con.execute("SELECT sae_stats FROM runs").fetchone()[0])
    con.close()
    assert "explained_variance" not in stats and "eval" not in stats


def test_train_sae_reports_a_missing_corpus_before_the_model_loads(tmp_path):
    args = ["train-sae", "--model", "tiny-llama", "--hook", HOOK, "--corpus",
            str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "sae")]
    proc = saescope(args, cwd=tmp_path, home=tmp_path / "data")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "not found" in one_error_line(proc)
    assert "loading" not in proc.stdout
    assert all_files(tmp_path) == []
