"""Partition definitions shared by assets, jobs and sensors (here, so that none of them imports another)."""

import dagster as dg

# One partition per dataset file (the sensor and the CLI add and delete them).
dataset_partitions = dg.DynamicPartitionsDefinition(name="datasets")

# One partition per adapter key: a content hash of the group's members, their data versions and the training
# settings (task_partition registers them), so an unchanged group is never retrained.
adapter_partitions = dg.DynamicPartitionsDefinition(name="adapters")
