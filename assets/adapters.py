"""Adapters: one LoRA (or QLoRA) adapter per group of datasets, plus the all-datasets baseline.

Each adapter is a partition keyed by a hash of its members, their data versions and the training settings,
so an unchanged group is never retrained. Training checkpoints every epoch and a killed run resumes; the saved
adapter is the epoch with the lowest loss on the members' selection fold of validation (ml.folds), never on the
weights fold (the ensemble weights) or test.
"""

import dagster as dg

from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL
from grouplora.orchestration.partitions import adapter_partitions
from grouplora.orchestration.resources import BaseModelResource, MlflowResource
from grouplora.orchestration.settings import TrainingSettings
from grouplora.orchestration.store import FOLD_SELECT, ArtifactStore


@dg.asset(
    partitions_def=adapter_partitions,
    # An adapter key is no dataset name: each adapter reads every dataset partition it was grouped with, so the
    # mapping is "all partitions" (the default identity mapping would point at dataset partitions that don't exist).
    deps=[dg.AssetKey("task_partition"),
          dg.AssetDep(dg.AssetKey("dataset"), partition_mapping=dg.AllPartitionMapping())],
    group_name="adapters",
    kinds={"pytorch", "mlflow"},
    code_version="1",
    description="A LoRA adapter trained with peft on one group's train data (peft format: adapter_config.json + "
                "adapter_model.safetensors); the 'all_' key is the one-adapter-on-everything baseline.",
    op_tags=GPU_OP_TAGS,  # loads the model
    pool=GPU_POOL,
)
def adapter(context: dg.AssetExecutionContext, store: ArtifactStore, base_model: BaseModelResource,
            training_settings: TrainingSettings, mlflow_tracking: MlflowResource) -> dg.MaterializeResult:
    key = context.partition_key
    spec = store.adapter_spec(key)
    if spec.get("numerics", base_model.numerics()) != base_model.numerics():  # the key promises these numerics
        raise dg.Failure(f"adapter {key} is keyed for {spec['numerics']} (dtype-device type) but this step runs "
                         f"{base_model.numerics()}: set --device/--dtype (or model: in the settings file) as when "
                         "task_partition ran, or re-materialize task_partition")
    model, tokenizer = base_model.load(load_in_4bit=training_settings.qlora or None)  # QLoRA: a 4-bit base
    examples = store.examples(tokenizer, spec["members"])
    select = store.examples(tokenizer, spec["members"], FOLD_SELECT)
    out_dir = store.adapter_dir(key)
    result, run_id = mlflow_tracking.train_logged(
        context, training_settings, base_model.model_name(), (model, tokenizer), examples, out_dir,
        run_name=f"adapter {key}", members=spec["members"],
        tags={"grouplora.kind": spec["kind"], "grouplora.adapter_key": key},
        val_examples=select or None, eval_batch_size=base_model.batch_size)
    store.write_adapter_result(key, {**result.to_dict(), "mlflow_run_id": run_id, "key": key,
                                     "members": spec["members"], "kind": spec["kind"]})
    return dg.MaterializeResult(metadata={
        "kind": spec["kind"], "members": spec["members"], "n_examples": len(examples),
        "final_loss": result.final_loss, "epoch_losses": result.epoch_losses, "steps": result.steps,
        "epochs": result.epochs, "best_epoch": result.best_epoch, "val_losses": result.val_losses,
        "n_select_examples": len(select), "eval_flops": result.eval_flops,
        "seconds": round(result.seconds, 1), "train_flops": result.flops,
        "peak_memory_mb": round(result.peak_memory_bytes / 2**20, 1), "resumed_from_epoch": result.resumed_from_epoch,
        "path": dg.MetadataValue.path(str(out_dir)), "mlflow_run_id": run_id})
