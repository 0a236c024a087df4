"""A GROUPLORA_HOME with glob characters ([, ], *, ?) in its path: DuckDB views over the storage folders still
read every partition (they used to match nothing, failing every dataset)."""

import duckdb
import pandas as pd
import pytest

from grouplora.orchestration.globs import check_home, escape_glob, literal_folder_glob
from grouplora.orchestration.resources import WarehouseResource
from grouplora.orchestration.store import DATASETS, ArtifactStore


def test_escape_glob():
    assert escape_glob("/a[1]/b*?c") == "/a[[]1[]]/b[*][?]c"
    assert literal_folder_glob("/x[1]/y?/*.parquet") == "/x[[]1[]]/y[?]/*.parquet"
    assert literal_folder_glob("plain/dir/file.parquet") == "plain/dir/file.parquet"
    with pytest.raises(ValueError, match="separator"):
        literal_folder_glob("/a\\b/*.parquet")


@pytest.mark.parametrize("home_name, sibling", [("home [v2]", None), ("a]b[c", None), ("run*1", "run_other_1"),
                                                ("run?", "runX")])
def test_views_over_a_home_with_glob_characters(tmp_path, home_name, sibling):
    """Brackets made the raw pattern match nothing; * and ? made it match other folders too (`sibling`: another
    home whose files the view must not read)."""

    def fill(home, datasets):
        storage = ArtifactStore(root=str(home / "storage"))
        for name, n in datasets:
            storage.write_dataset(name, pd.DataFrame({"dataset": [name] * n, "x": range(n)}), {"name": name})
        return storage

    home = tmp_path / home_name
    storage = fill(home, [("alpha", 3), ("beta", 2)])
    db = tmp_path / "warehouse.duckdb"  # not under `home`: DuckDB cannot hold a database under a '?' (below)
    if sibling:
        fill(tmp_path / sibling, [("gamma", 5)])
    raw = storage.parquet_glob(DATASETS)
    wrong = duckdb.sql(f"SELECT count(*) FROM read_parquet('{raw}')").fetchall()[0][0] if sibling else None
    if sibling:
        assert wrong == 10  # what DuckDB does with the raw pattern: reads the sibling home too
    else:
        with pytest.raises(duckdb.IOException, match="No files found"):  # or matches nothing at all
            duckdb.sql(f"SELECT count(*) FROM read_parquet('{raw}')").fetchall()
    warehouse = WarehouseResource(path=str(db))
    warehouse.register_parquet("datasets", raw)
    counts = warehouse.query("SELECT dataset, count(*) AS n FROM datasets GROUP BY dataset ORDER BY dataset")
    assert counts.to_dict("records") == [{"dataset": "alpha", "n": 3}, {"dataset": "beta", "n": 2}]
    warehouse.register_parquet("one", "beta".join(storage.parquet_glob(DATASETS).rsplit("*", 1)))  # a single file, as estimates do
    assert warehouse.query("SELECT count(*) AS n FROM one")["n"].tolist() == [2]


def test_a_home_duckdb_cannot_use_is_refused_clearly(tmp_path):
    home = tmp_path / "wh?at"
    home.mkdir()
    with pytest.raises(duckdb.Error, match=r"wh\.wal\?at"):  # why: DuckDB names its log by cutting at '?'
        con = duckdb.connect(str(home / "w.duckdb"))
        con.execute("CREATE TABLE t AS SELECT 1 AS x")
    with pytest.raises(ValueError, match=r"contains '\?', which DuckDB cannot use in a path"):
        check_home(home)
    with pytest.raises(ValueError, match=r"contains '\\\\'"):
        check_home(tmp_path / "back\\slash")
    assert check_home(tmp_path / "brackets [ok]") == (tmp_path / "brackets [ok]").resolve()
