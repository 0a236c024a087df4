"""Adapters: one LoRA (or QLoRA) adapter per group of datasets, plus the all-datasets baseline.

Each adapter is a partition keyed by a hash of its members, their data versions and the training settings,
so an unchanged group is never retrained. Training checkpoints every epoch and a killed run resumes.
"""

import json
from pathlib import Path

import dagster as dg
import pandas as pd

from grouplora.assets.datasets import dataset
from grouplora.assets.partition import adapter_partitions, task_partition
from grouplora.ml.atomic import write_json
from grouplora.ml.model import label_token_ids
from grouplora.ml.training import TrainExample, TrainResult, train_adapter
from grouplora.orchestration.resources import BaseModelResource, MlflowResource, StorageResource, TrainingSettings


def train_examples(storage: StorageResource, tokenizer, members: list[str], split: str = "train") -> list[TrainExample]:
    """Every member dataset's examples of one split, each with its own dataset's label tokens."""
    out = []
    for name in members:
        df = pd.read_parquet(storage.path("datasets", name), columns=["prompt", "label_id", "split"])
        card = json.loads(storage.path("datasets", name, ".json").read_text())
        ids = label_token_ids(tokenizer, card["label_words"])
        out += [TrainExample(p, int(y), ids) for p, y in zip(df["prompt"][df["split"] == split],
                                                             df["label_id"][df["split"] == split])]
    return out


def train_logged(context: dg.AssetExecutionContext, base_model: BaseModelResource, training_settings: TrainingSettings,
                 mlflow_tracking: MlflowResource, model_and_tokenizer, examples: list[TrainExample], out_dir: Path, *,
                 run_name: str, tags: dict[str, str], members: list[str]) -> tuple[TrainResult, str]:
    """train_adapter inside an MLflow run (params, per-step metrics, final metrics, the peft files as artifacts).
    Returns (result, MLflow run id). Shared by every asset that trains an adapter."""
    config = training_settings.config()
    mlflow = mlflow_tracking.client_setup()
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({**tags, "grouplora.members": ",".join(members), "dagster.run_id": context.run.run_id})
        mlflow.log_params({**{k: v for k, v in vars(config).items()}, "n_examples": len(examples),
                           "base_model": base_model.name})

        def on_step(step: int, metrics: dict) -> None:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
            if "epoch_loss" in metrics:
                context.log.info(f"{run_name}: epoch {metrics.get('epoch')} loss {metrics['epoch_loss']:.4f}")

        result = train_adapter(model_and_tokenizer, examples, config, out_dir, on_step=on_step)
        mlflow.log_metrics({"final_loss": result.final_loss, "train_flops": float(result.flops),
                            "peak_memory_bytes": float(result.peak_memory_bytes), "seconds": result.seconds})
        for path in sorted(Path(out_dir).glob("adapter_*")):  # the peft files, not the epoch checkpoints
            mlflow.log_artifact(str(path), artifact_path="adapter")
    return result, run.info.run_id


@dg.asset(
    partitions_def=adapter_partitions,
    # An adapter key is no dataset name: each adapter reads every dataset partition it was grouped with, so the
    # mapping is "all partitions" (the default identity mapping would point at dataset partitions that don't exist).
    deps=[task_partition, dg.AssetDep(dataset, partition_mapping=dg.AllPartitionMapping())],
    group_name="adapters",
    kinds={"pytorch", "mlflow"},
    code_version="1",
    description="A LoRA adapter trained with peft on one group's train data (peft format: adapter_config.json + "
                "adapter_model.safetensors); the 'all_' key is the one-adapter-on-everything baseline.",
)
def adapter(context: dg.AssetExecutionContext, storage: StorageResource, base_model: BaseModelResource,
            training_settings: TrainingSettings, mlflow_tracking: MlflowResource) -> dg.MaterializeResult:
    key = context.partition_key
    spec_path = storage.path("adapters", key, ".json")
    if not spec_path.exists():
        raise dg.Failure(f"adapter {key!r} has no spec at {spec_path}: materialize task_partition first")
    spec = json.loads(spec_path.read_text())
    model, tokenizer = base_model.load(load_in_4bit=training_settings.qlora or None)  # QLoRA: a 4-bit base
    examples = train_examples(storage, tokenizer, spec["members"])
    out_dir = storage.path("adapters", key, "")
    result, run_id = train_logged(context, base_model, training_settings, mlflow_tracking, (model, tokenizer), examples,
                                  out_dir, run_name=f"adapter {key}", members=spec["members"],
                                  tags={"grouplora.kind": spec["kind"], "grouplora.adapter_key": key})
    write_json({**result.to_dict(), "mlflow_run_id": run_id, "key": key, "members": spec["members"],
                "kind": spec["kind"]}, storage.path("adapters", key, ".result.json"))
    return dg.MaterializeResult(metadata={
        "kind": spec["kind"], "members": spec["members"], "n_examples": len(examples),
        "final_loss": result.final_loss, "epoch_losses": result.epoch_losses, "steps": result.steps,
        "seconds": round(result.seconds, 1), "train_flops": result.flops,
        "peak_memory_mb": round(result.peak_memory_bytes / 2**20, 1), "resumed_from_epoch": result.resumed_from_epoch,
        "path": dg.MetadataValue.path(str(out_dir)), "mlflow_run_id": run_id})
