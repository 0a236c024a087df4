"""Meta-initialization: one LoRA adapter trained on every dataset at once (multitask).

Gradient features taken at it (meta_gradient_features) have B ≠ 0, so they carry the lora_A gradients too, and the
first-order estimates of fine-tuning from there are what target_selection uses to choose auxiliary datasets.

Training runs in a work folder keyed by the run's content (data, settings, base model): a killed run resumes from
its last epoch, an unchanged one returns at once. The store then swaps the finished adapter in for the current one
as a whole, so a reader (or a retraining that fails) never sees half of one.
"""

import dagster as dg

from grouplora.ml.model import model_fingerprint
from grouplora.ml.training import run_key
from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL
from grouplora.orchestration.resources import BaseModelResource, MlflowResource
from grouplora.orchestration.settings import TrainingSettings
from grouplora.orchestration.store import DATASETS, META_INIT, ArtifactStore


@dg.asset(
    # Like `adapter`: one unpartitioned adapter reads every dataset partition.
    deps=[dg.AssetDep(dg.AssetKey("dataset"), partition_mapping=dg.AllPartitionMapping())],
    group_name="selection",
    kinds={"pytorch", "mlflow"},
    code_version="1",
    description="One LoRA adapter trained on every dataset's train split (multitask): the meta-initialization θ0 "
                "at which meta_gradient_features are taken (peft format, storage/adapters/meta_init/).",
    op_tags=GPU_OP_TAGS,  # loads the model
    pool=GPU_POOL,
)
def meta_init_adapter(context: dg.AssetExecutionContext, store: ArtifactStore, base_model: BaseModelResource,
                      training_settings: TrainingSettings, mlflow_tracking: MlflowResource) -> dg.MaterializeResult:
    names = store.current_datasets(context, DATASETS)
    if not names:
        raise dg.Failure("no materialized dataset partitions: materialize `dataset` first")
    model, tokenizer = base_model.load(load_in_4bit=training_settings.qlora or None)
    examples = store.examples(tokenizer, names)
    key = run_key(training_settings.config(), f"{model_fingerprint(model)}-{base_model.numerics()}", examples,
                  None)[:16]
    work = store.training_dir(f"{META_INIT}_{key}")  # checkpoints per epoch; resumes; keyed by content
    result, run_id = mlflow_tracking.train_logged(
        context, training_settings, base_model.model_name(), (model, tokenizer), examples, work,
        run_name="meta_init_adapter", members=names, tags={"grouplora.kind": "meta_init", "grouplora.adapter_key": META_INIT})
    fingerprint = store.adapter_fingerprint(work)
    record = {**result.to_dict(), "datasets": names, "n_examples": len(examples), "mlflow_run_id": run_id,
              "fingerprint": fingerprint, "training": training_settings.fingerprint(), "run_key": key}
    out_dir = store.write_meta_init(work, record)
    context.log.info(f"meta-init adapter on {len(names)} datasets, {len(examples)} examples: "
                     f"final loss {result.final_loss:.4f} in {result.seconds:.1f}s")
    return dg.MaterializeResult(metadata={
        "datasets": names, "n_datasets": len(names), "n_examples": len(examples),
        "final_loss": result.final_loss, "epoch_losses": result.epoch_losses, "steps": result.steps,
        "train_flops": result.flops, "seconds": round(result.seconds, 1),
        "peak_memory_mb": round(result.peak_memory_bytes / 2**20, 1), "resumed_from_epoch": result.resumed_from_epoch,
        "fingerprint": fingerprint, "path": dg.MetadataValue.path(str(out_dir)), "mlflow_run_id": run_id,
        "training": training_settings.fingerprint(), "numerics": base_model.numerics()})
