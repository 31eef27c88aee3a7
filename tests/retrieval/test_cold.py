"""Cold-start datasets (`retrieval data cold`) and their evaluation (`retrieval evaluate
--cold`): what is written never leaks a cold id into training, too small a cutoff is refused,
and the evaluation scores only cold items (users) for the model, popularity and random."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from retrieval.cli import main
from retrieval.data.cold import ColdSplitError, cold_ids, make_cold_dataset
from retrieval.data.dataset import COLD_STATS_KEY, DatasetError, load_dataset, write_dataset
from retrieval.features import INTERACTIONS_FILE, ITEM_ID, SPLIT, TIMESTAMP, USER_ID

ITEMS_QUANTILE = 0.5  # on the tiny dataset: a few dozen cold items


@pytest.fixture(scope="module")
def cold_items(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cold") / "items"
    make_cold_dataset(tiny_dataset, out, "items", quantile=ITEMS_QUANTILE, min_users=3)
    return out


def test_cold_items_never_reach_train_or_valid(tiny_dataset: Path, cold_items: Path) -> None:
    # Asserted on the written parquet, not through the library that wrote it.
    written = pq.read_table(cold_items / INTERACTIONS_FILE)
    record = json.loads((cold_items / "schema.json").read_text())["stats"][COLD_STATS_KEY]
    ids = set(record["ids"])
    original = load_dataset(tiny_dataset).interactions
    first_seen: dict[str, int] = {}
    for item, time in zip(
        original[ITEM_ID].to_pylist(), original[TIMESTAMP].to_pylist(), strict=True
    ):
        first_seen[item] = min(time, first_seen.get(item, time))
    assert ids == {i for i, t in first_seen.items() if t > record["cutoff_timestamp"]}
    assert len(ids) >= 10
    context = written.filter(pc.is_in(written[SPLIT], value_set=pa.array(["train", "valid"])))
    assert not ids & set(context[ITEM_ID].to_pylist())
    scored = written.filter(pc.is_in(written[ITEM_ID], value_set=pa.array(sorted(ids))))
    assert set(scored[SPLIT].to_pylist()) == {"test"} and scored.num_rows > 0
    # Every other row is kept as it was.
    warm = original.filter(pc.invert(pc.is_in(original[ITEM_ID], value_set=pa.array(sorted(ids)))))
    assert written.num_rows == warm.num_rows + scored.num_rows
    assert record["dropped_interactions"] == original.num_rows - written.num_rows


def test_cold_users_have_every_event_in_test(tiny_dataset: Path, tmp_path: Path) -> None:
    dataset = make_cold_dataset(tiny_dataset, tmp_path / "users", "users", quantile=0.3)
    ids = dataset.schema.stats[COLD_STATS_KEY]["ids"]
    written = pq.read_table(tmp_path / "users" / INTERACTIONS_FILE)
    mine = written.filter(pc.is_in(written[USER_ID], value_set=pa.array(ids)))
    assert len(ids) >= 10 and set(mine[SPLIT].to_pylist()) == {"test"}
    assert written.num_rows == load_dataset(tiny_dataset).interactions.num_rows


def test_too_late_a_cutoff_is_refused_with_the_counts(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ColdSplitError, match=r"leaves \d+ cold items; at least 10"):
        make_cold_dataset(tiny_dataset, tmp_path / "a", "items", quantile=0.999)
    with pytest.raises(ColdSplitError, match=r"only \d+ users with a cold test interaction"):
        make_cold_dataset(tiny_dataset, tmp_path / "b", "items", quantile=0.5, min_users=10_000)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="`quantile`"):
        make_cold_dataset(tiny_dataset, tmp_path / "c", "items", quantile=1.5)


def test_a_cold_id_in_train_is_refused_by_validation(cold_items: Path, tmp_path: Path) -> None:
    dataset = load_dataset(cold_items)
    leaked_id = dataset.schema.stats[COLD_STATS_KEY]["ids"][0]
    events = dataset.interactions
    first_train = events[SPLIT].to_pylist().index("train")
    items = events[ITEM_ID].to_pylist()
    items[first_train] = leaked_id
    events = events.set_column(events.schema.get_field_index(ITEM_ID), ITEM_ID, pa.array(items))
    with pytest.raises(DatasetError, match="train/valid rows hold cold items"):
        write_dataset(tmp_path / "bad", dataset.users, dataset.items, events, dataset.schema)


def test_cold_ids_are_those_first_seen_after_the_cutoff() -> None:
    events = pa.table(
        {
            USER_ID: ["u", "v", "u", "v"],
            ITEM_ID: ["a", "b", "b", "c"],
            TIMESTAMP: pa.array([10, 20, 30, 40], pa.int64()),
        }
    )
    assert cold_ids(events, "items", cutoff=15) == ["b", "c"]
    assert cold_ids(events, "users", cutoff=15) == ["v"]


def test_evaluate_cold_items_scores_only_cold_items(
    cold_items: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tiny_data import tiny_train_config

    from training.trainer import train

    model = tmp_path / "model"
    train(cold_items, model, tiny_train_config(eval={"ks": [5, 10], "metric": "recall@10",
                                                    "baselines": []}), progress=False)  # fmt: skip
    out = tmp_path / "cold.json"
    args = ["evaluate", "--model", str(model), "--data", str(cold_items), "--cold", "items"]
    assert main([*args, "--k", "10,50", "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    results = report["results"]
    assert set(results) == {"model", "popularity", "random", "ease", "als"}
    assert results["ease"]["skipped"].startswith("n/a") and "n/a" in results["als"]["skipped"]
    # Popularity counts the context, where no cold item appears: it scores them last, so
    # within the first K it can reach none while warm items remain.
    assert results["popularity"]["recall@10"] == 0.0
    assert 0 <= results["random"]["recall@50"] <= 1 and 0 <= results["model"]["recall@50"] <= 1
    assert (
        report["cold"]["mode"] == "items" and report["num_users"] == report["cold"]["scored_users"]
    )
    assert "cold start (items)" in printed
    # The mode must match the dataset.
    assert main([*args[:-1], "users", "--no-progress"]) == 1
    assert "needs a dataset written by `retrieval data cold users`" in capsys.readouterr().err


def test_data_cold_cli_writes_the_dataset_and_refuses_a_cold_input(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cold"
    args = ["data", "cold", "users", "--data", str(tiny_dataset), "--out", str(out)]
    assert main([*args, "--quantile", "0.3"]) == 0
    assert "cold users:" in capsys.readouterr().out
    assert load_dataset(out).schema.stats[COLD_STATS_KEY]["mode"] == "users"
    again = ["data", "cold", "items", "--data", str(out), "--out", str(tmp_path / "x")]
    assert main(again) == 1
    assert "already a cold-start dataset" in capsys.readouterr().err
