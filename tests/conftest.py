"""Shared fixtures."""

import pytest
import torch

from grouplora.ml.model import load_base_model


@pytest.fixture(scope="module")
def one_thread():
    # A 64-wide model is dominated by thread hand-off on a shared 2-core box: one thread is faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Llama and its in-memory tokenizer (no download)."""
    return load_base_model("tiny")


def tick_sensor(sensor, instance, cursor, resources):
    """One evaluation of a sensor, applying its dynamic-partition requests to the instance as the daemon does."""
    import dagster as dg

    result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources))
    for req in result.dynamic_partitions_requests:
        if isinstance(req, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        else:
            for key in req.partition_keys:
                instance.delete_dynamic_partition(req.partitions_def_name, key)
    return result
