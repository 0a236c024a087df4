"""The task partition: datasets grouped by estimated affinity (SDP or spectral clustering), one adapter per group."""

import hashlib
import time

import dagster as dg
import numpy as np
import pandas as pd

from grouplora.ml.clustering import affinity_matrix_from, partition_datasets
from grouplora.ml.plots import affinity_heatmap
from grouplora.orchestration.partitions import adapter_partitions
from grouplora.orchestration.resources import BaseModelResource, DatasetSourceResource, WarehouseResource
from grouplora.orchestration.settings import PartitionSettings, TrainingSettings
from grouplora.orchestration.store import ArtifactStore, png_markdown


def affinity_matrix(warehouse: WarehouseResource, column: str = "affinity_neg_loss") -> tuple[np.ndarray, list[str]]:
    """T[i, j] from the subset_affinity table (target i, source j); higher = j helps i more."""
    if column not in ("affinity_neg_loss", "affinity_accuracy"):
        raise ValueError(f"unknown affinity column {column!r}")
    df = warehouse.query(f"SELECT target, source, {column} AS value FROM subset_affinity")
    if df.empty:
        raise dg.Failure("subset_affinity is empty: it averages over random subsets, which need at least 3 "
                         "datasets and EstimationSettings.size >= 3")
    return affinity_matrix_from(df)


def group_key(kind: str, members: list[str], versions: dict[str, str], training: str, numerics: str) -> str:
    """Stable adapter key: the members, their data versions, the training settings (batch size included) and the
    base model's numerics (dtype, device type). An unchanged group keeps its key, so its adapter partition is
    already materialized and is never retrained."""
    blob = "|".join([kind, training, numerics, *[f"{m}={versions[m]}" for m in sorted(members)]])
    return f"{kind}_{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@dg.asset(
    deps=[dg.AssetKey("subset_affinity")],
    group_name="grouping",
    kinds={"numpy", "json"},
    code_version="1",
    description="Datasets partitioned into m groups by clustering the symmetrized task-affinity matrix; "
                "registers one adapter partition per group plus the all-datasets baseline.",
)
def task_partition(context: dg.AssetExecutionContext, store: ArtifactStore, warehouse: WarehouseResource,
                   sources: DatasetSourceResource, partition_settings: PartitionSettings,
                   training_settings: TrainingSettings, base_model: BaseModelResource) -> dg.MaterializeResult:
    start = time.perf_counter()
    T, names = affinity_matrix(warehouse)
    ps = partition_settings
    start_clustering = time.perf_counter()
    part = partition_datasets(T, names, m=ps.m, max_m=ps.max_m, method=ps.method, normalize=ps.normalize,
                              seed=ps.seed)
    clustering_seconds = time.perf_counter() - start_clustering
    m, scores = part.m, part.m_scores
    relaxed = float(part.sdp.objective) if part.sdp is not None else float("nan")
    files = sources.files()
    gone = [name for name in names if name not in files]
    if gone:  # their partitions are still registered: `grouplora run` and the sensor delete them
        raise dg.Failure(f"dataset(s) {', '.join(gone)} have gradient features but no usable file in {sources.root()} "
                         "any more (removed?): delete their dataset partitions, then rerun the suite")
    versions = {name: sources.version(name) for name in names}
    training, numerics = training_settings.fingerprint(), base_model.numerics()
    groups = [{"key": group_key("g", members, versions, training, numerics), "members": members, "kind": "group"}
              for members in part.groups]
    baseline = {"key": group_key("all", names, versions, training, numerics), "members": names, "kind": "baseline"}
    spec = {"datasets": names, "m": int(m), "method": ps.method, "normalize": ps.normalize,
            "objective": part.objective, "relaxed_objective": relaxed,
            "groups": groups, "baseline": baseline, "versions": versions}
    store.write_partition(spec, [{**g, "versions": {k: versions[k] for k in g["members"]}, "training": training,
                                  "numerics": numerics} for g in [*groups, baseline]])
    png = affinity_heatmap(T, names, part.labels,
                           title=f"Task affinity: mean est. −loss of target i over subsets with j ({ps.method})",
                           path=store.png_path("partition", "affinity_heatmap"))
    keys = [g["key"] for g in groups] + [baseline["key"]]
    new = [k for k in keys if not context.instance.has_dynamic_partition(adapter_partitions.name, k)]
    if new:
        context.instance.add_dynamic_partitions(adapter_partitions.name, new)
    table = pd.DataFrame([{"group": i, "key": g["key"], "members": ", ".join(g["members"])} for i, g in enumerate(groups)])
    context.log.info(f"{m} groups: " + "; ".join(", ".join(g["members"]) for g in groups))
    metadata = {"m": int(m), "method": ps.method, "groups": dg.MetadataValue.md(table.to_markdown(index=False)),
                "objective": float(spec["objective"]), "new_adapter_keys": new, "heatmap": png_markdown(png),
                "heatmap_path": dg.MetadataValue.path(str(png)), "seconds": round(time.perf_counter() - start, 3)}
    metadata |= {"n_datasets": len(names), "clustering_seconds": round(clustering_seconds, 3)}
    if part.sdp is not None:  # the certificate: no partition into m groups beats ours by more than the gap
        metadata |= {"sdp_upper_bound": float(part.sdp.upper_bound), "sdp_certified_gap": float(part.sdp.certified_gap),
                     "sdp_relative_gap": float(part.sdp.certified_gap / max(abs(part.sdp.upper_bound), 1e-12)),
                     "sdp_iterations": int(part.sdp.iterations), "sdp_converged": bool(part.sdp.converged)}
    if scores is not None:
        metadata["m_selection"] = dg.MetadataValue.md(scores.to_markdown(index=False))
    return dg.MaterializeResult(metadata=metadata)
