"""MLflow tracking: a new SQLite store created by several runs at once."""

from __future__ import annotations

import multiprocessing as mp


def _start(uri: str, barrier, errors) -> None:
    from orchestration.tracking import open_run, start_experiment

    barrier.wait()  # every process creates the store at the same moment
    try:
        start_experiment(uri, "race")
        with open_run("racer"):
            pass
    except Exception as exc:  # reported to the test, which names it
        errors.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def test_runs_started_together_on_a_new_sqlite_store_all_succeed(tmp_path):
    """MLflow migrates a new SQLite schema on first use; two drivers doing it at once raced
    (``table runs already exists``). The store's creation is serialised with a file lock."""
    ctx = mp.get_context("spawn")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    barrier, errors = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_start, args=(uri, barrier, errors)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, found
    assert all(p.exitcode == 0 for p in procs)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("race").experiment_id])) == 4


def test_artifacts_of_a_new_sqlite_store_sit_beside_it(tmp_path, monkeypatch):
    """Not in ``./mlruns`` of the directory the run started from (MLflow's default), where every
    store used from that directory would pile its artifacts together."""
    import mlflow

    from orchestration.tracking import open_run, start_experiment

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    start_experiment(f"sqlite:///{tmp_path}/store/mlruns.db", "beside")
    with open_run("artifact"):
        mlflow.log_text("hello", "note.txt")
    assert [p.read_text() for p in (tmp_path / "store" / "mlruns").rglob("note.txt")] == ["hello"]
    assert not (elsewhere / "mlruns").exists()
