"""Zero-shot scores: the base model's label-word log-probabilities for every example (the first real number)."""


import time

import dagster as dg
import numpy as np
import pandas as pd

from grouplora.ml.model import label_token_ids, model_fingerprint
from grouplora.ml.scoring import predict_logprobs
from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL
from grouplora.orchestration.partitions import dataset_partitions
from grouplora.orchestration.resources import BaseModelResource, WarehouseResource
from grouplora.orchestration.store import ZERO_SHOT, ArtifactStore


@dg.asset(
    partitions_def=dataset_partitions,
    deps=[dg.AssetKey("dataset")],
    group_name="data",
    kinds={"pytorch", "parquet"},
    code_version="1",
    description="Zero-shot label log-probabilities of the base model for every example of one dataset.",
    op_tags=GPU_OP_TAGS,  # loads the model
    pool=GPU_POOL,
)
def zero_shot_scores(context: dg.AssetExecutionContext, store: ArtifactStore, warehouse: WarehouseResource,
                     base_model: BaseModelResource) -> dg.MaterializeResult:
    name = context.partition_key
    df = store.rows(name)
    card = store.card(name)
    model, tokenizer = base_model.load()
    label_ids = label_token_ids(tokenizer, card["label_words"])
    start = time.perf_counter()
    logprobs = predict_logprobs(model, tokenizer, df["prompt"].tolist(), label_ids,
                                batch_size=base_model.batch_size, max_length=base_model.max_length)
    seconds = time.perf_counter() - start
    pred = logprobs.argmax(1)
    out = pd.DataFrame({"dataset": name, "example_id": df["example_id"], "split": df["split"],
                        "label_id": df["label_id"], "pred": pred, "correct": pred == df["label_id"].to_numpy(),
                        "logprobs": list(logprobs.astype(np.float32))})
    store.write_zero_shot(name, out)
    warehouse.register_parquet("zero_shot_scores", store.parquet_glob(ZERO_SHOT))
    acc = out.groupby("split")["correct"].mean().round(4).to_dict()
    context.log.info(f"{name}: zero-shot accuracy {acc} ({len(df) / seconds:.1f} examples/s)")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(out), **{f"accuracy_{k}": float(v) for k, v in acc.items()},
        "chance": 1.0 / len(label_ids), "seconds": round(seconds, 2), "examples_per_s": round(len(df) / seconds, 2),
        "model_fingerprint": model_fingerprint(model), "dtype": base_model.dtype})
