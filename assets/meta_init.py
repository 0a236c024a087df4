"""Meta-initialization: one LoRA adapter trained on every dataset at once (multitask).

Gradient features taken at it (meta_gradient_features) have B ≠ 0, so they carry the lora_A gradients too, and the
first-order estimates of fine-tuning from there are what target_selection uses to choose auxiliary datasets.

Training runs in a work folder keyed by the run's content (data, settings, base model): a killed run resumes from
its last epoch, an unchanged one returns at once. The finished adapter is then swapped in for
storage/adapters/meta_init/ as a whole, so a reader (or a retraining that fails) never sees half of one.
"""

import hashlib
import json
import shutil
from pathlib import Path
from shutil import copy2

import dagster as dg

from grouplora.assets.adapters import train_examples, train_logged
from grouplora.assets.datasets import current_datasets, dataset
from grouplora.ml.atomic import atomic_dir
from grouplora.ml.model import model_fingerprint
from grouplora.ml.training import run_key
from grouplora.orchestration.resources import BaseModelResource, MlflowResource, StorageResource, TrainingSettings

META_INIT = "meta_init"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SIDECAR = "meta_init.json"  # inside the adapter folder, so it is swapped in with the weights it describes


def meta_init_dir(storage: StorageResource) -> Path:
    return storage.path("adapters", META_INIT, "")


def adapter_fingerprint(folder: Path) -> str:
    """Hash of the adapter's weight file: which θ0 a set of meta features was taken at."""
    return hashlib.sha256((Path(folder) / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


def read_meta_init(storage: StorageResource) -> dict:
    """The current meta-init adapter's record (datasets, training result, fingerprint); Failure if there is none."""
    folder = meta_init_dir(storage)
    if not all((folder / f).exists() for f in (*ADAPTER_FILES, SIDECAR)):
        raise dg.Failure(f"no meta-initialization adapter at {folder}: materialize meta_init_adapter first")
    return json.loads((folder / SIDECAR).read_text())


@dg.asset(
    # Like `adapter`: one unpartitioned adapter reads every dataset partition.
    deps=[dg.AssetDep(dataset, partition_mapping=dg.AllPartitionMapping())],
    group_name="selection",
    kinds={"pytorch", "mlflow"},
    code_version="1",
    description="One LoRA adapter trained on every dataset's train split (multitask): the meta-initialization θ0 "
                "at which meta_gradient_features are taken (peft format, storage/adapters/meta_init/).",
)
def meta_init_adapter(context: dg.AssetExecutionContext, storage: StorageResource, base_model: BaseModelResource,
                      training_settings: TrainingSettings, mlflow_tracking: MlflowResource) -> dg.MaterializeResult:
    names = current_datasets(context, storage, "datasets")
    if not names:
        raise dg.Failure("no materialized dataset partitions: materialize `dataset` first")
    model, tokenizer = base_model.load(load_in_4bit=training_settings.qlora or None)
    examples = train_examples(storage, tokenizer, names)
    key = run_key(training_settings.config(), model_fingerprint(model), examples, None)[:16]
    work = storage.path("training", f"{META_INIT}_{key}", "")  # checkpoints per epoch; resumes; keyed by content
    result, run_id = train_logged(context, base_model, training_settings, mlflow_tracking, (model, tokenizer), examples,
                                  work, run_name="meta_init_adapter", members=names,
                                  tags={"grouplora.kind": "meta_init", "grouplora.adapter_key": META_INIT})
    fingerprint = adapter_fingerprint(work)
    record = {**result.to_dict(), "datasets": names, "n_examples": len(examples), "mlflow_run_id": run_id,
              "fingerprint": fingerprint, "training": training_settings.fingerprint(), "run_key": key}
    out_dir = meta_init_dir(storage)
    with atomic_dir(out_dir) as tmp:  # the old adapter stays whole until the new one is complete
        for name in ADAPTER_FILES:
            copy2(work / name, tmp / name)
        (tmp / SIDECAR).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    for old in storage.folder("training").glob(f"{META_INIT}_*"):  # earlier runs' work folders
        if old.is_dir() and old.name != work.name:
            shutil.rmtree(old, ignore_errors=True)
    context.log.info(f"meta-init adapter on {len(names)} datasets, {len(examples)} examples: "
                     f"final loss {result.final_loss:.4f} in {result.seconds:.1f}s")
    return dg.MaterializeResult(metadata={
        "datasets": names, "n_datasets": len(names), "n_examples": len(examples),
        "final_loss": result.final_loss, "epoch_losses": result.epoch_losses, "steps": result.steps,
        "train_flops": result.flops, "seconds": round(result.seconds, 1),
        "peak_memory_mb": round(result.peak_memory_bytes / 2**20, 1), "resumed_from_epoch": result.resumed_from_epoch,
        "fingerprint": fingerprint, "path": dg.MetadataValue.path(str(out_dir)), "mlflow_run_id": run_id})
