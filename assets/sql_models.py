"""A small dbt-like runner: every `dbt_like_sql/models/<name>.sql` becomes an asset that builds table <name>
in DuckDB. Its upstream assets are the tables the SQL reads, found by DuckDB's own parser, so the lineage in
the UI comes from the SQL itself. A model is built in one transaction (CREATE OR REPLACE TABLE), so readers
see the old table or the new one, and a failed build leaves the old one in place."""


import hashlib
import time
from importlib import resources
from pathlib import Path

import dagster as dg
import duckdb

from grouplora.ml.data_format import validate_name
from grouplora.orchestration.resources import WarehouseResource

# DuckDB views that Python assets register over their Parquet partitions: view name -> producing asset.
SOURCE_VIEWS: dict[str, str] = {
    "datasets": "dataset",
    "zero_shot_scores": "zero_shot_scores",
    "gradient_features": "gradient_features",
    "meta_gradient_features": "meta_gradient_features",
    "subset_estimates": "subset_estimates",
    "ensemble_results": "ensemble",
    "target_selection": "target_selection",
}


def models_folder() -> Path:
    return Path(str(resources.files("grouplora.dbt_like_sql") / "models"))


def read_models(folder: Path | None = None) -> dict[str, str]:
    folder = folder or models_folder()
    out = {}
    for path in sorted(folder.glob("*.sql")):
        name = validate_name(path.stem, "SQL model name")
        out[name] = path.read_text(encoding="utf-8")
    return out


def upstream_tables(name: str, sql: str) -> set[str]:
    try:
        return {t.lower() for t in duckdb.get_table_names(sql)}
    except duckdb.Error as e:
        raise ValueError(f"dbt_like_sql/models/{name}.sql: cannot parse: {e}") from e


def description_of(sql: str) -> str:
    lines = [ln[2:].strip() for ln in sql.splitlines() if ln.startswith("--")]
    return " ".join(lines) or "SQL model"


def build_sql_assets(folder: Path | None = None) -> list[dg.AssetsDefinition]:
    models = read_models(folder)
    assets = []
    for name, sql in models.items():
        deps = []
        for table in sorted(upstream_tables(name, sql)):
            if table in models:
                deps.append(dg.AssetKey(table))
            elif table in SOURCE_VIEWS:
                deps.append(dg.AssetKey(SOURCE_VIEWS[table]))
            else:
                raise ValueError(f"dbt_like_sql/models/{name}.sql reads {table!r}, which is neither a model "
                                 f"nor a registered view ({sorted(SOURCE_VIEWS)})")
        assets.append(_sql_asset(name, sql, deps))
    return assets


def _sql_asset(name: str, sql: str, deps: list[dg.AssetKey]) -> dg.AssetsDefinition:
    @dg.asset(name=name, deps=deps, group_name="sql", kinds={"duckdb", "sql"}, description=description_of(sql),
              code_version=hashlib.sha256(sql.encode()).hexdigest()[:12], metadata={"sql": dg.MetadataValue.md(f"```sql\n{sql}\n```")})
    def _model(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
        start = time.perf_counter()
        run_model(warehouse, name, sql)
        preview = warehouse.query(f"SELECT * FROM {name} LIMIT 50")
        rows = int(warehouse.query(f"SELECT count(*) AS n FROM {name}")["n"][0])
        return dg.MaterializeResult(metadata={"dagster/row_count": rows, "seconds": round(time.perf_counter() - start, 3),
                                              "preview": dg.MetadataValue.md(preview.to_markdown(index=False))})

    return _model


def run_model(warehouse: WarehouseResource, name: str, sql: str) -> None:
    validate_name(name, "SQL model name")
    body = sql.strip().rstrip(";")
    with warehouse.connect() as con:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"CREATE OR REPLACE TABLE {name} AS {body}")
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
