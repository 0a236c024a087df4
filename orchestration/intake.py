"""Which files of the datasets folder can run now: what `grouplora run` checks before any run, so that one bad file
fails on its own, with one line naming it, and the other datasets go on.

A file that cannot be a dataset (bad name, symlink out of the folder, not a regular file: ml.data_format.scan) or
whose content fails validation (the same load_dataset, with the tokenizer's label-word check, that the `dataset`
asset runs) is reported and left out. A file whose version is already materialized was validated then and is not
read again. A broken settings file stops everything: every dataset's settings come from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg

from grouplora.ml.data_format import DatasetError, load_dataset
from grouplora.orchestration.freshness import dataset_is_stale
from grouplora.orchestration.resources import BaseModelResource, DatasetSourceResource


@dataclass
class FolderCheck:
    versions: dict[str, str] = field(default_factory=dict)  # usable dataset -> its content version
    problems: list[DatasetError] = field(default_factory=list)  # one per unusable file, in folder order


def check_folder(sources: DatasetSourceResource, base_model: BaseModelResource,
                 instance: dg.DagsterInstance) -> FolderCheck:
    """The usable datasets of the folder with their versions, and one DatasetError per file that is not usable.
    Raises DatasetError (ConfigError) when the folder cannot be listed or its settings file is broken."""
    root = sources.root()
    if not root.is_dir():
        raise DatasetError(root, "no such datasets folder" if not root.exists() else "not a folder")
    files, problems = sources.scan()
    suite = sources.config()
    check = FolderCheck(problems=list(problems))
    for name, path in sorted(files.items()):
        try:
            version = sources.version(name)
            if dataset_is_stale(instance, name, version):
                load_dataset(path, suite.for_dataset(name), seed=sources.seed, first_token=base_model.first_token)
        except DatasetError as e:
            check.problems.append(e)
            continue
        except OSError as e:  # vanished or unreadable between the listing and now
            check.problems.append(DatasetError(path, f"cannot read: {e.strerror or e}"))
            continue
        check.versions[name] = version
    return check
