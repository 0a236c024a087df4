"""Put stage records computed in a later machine session into a committed suite result.

suite.py writes one JSON per stage into its work folder and assembles them into its --out file. When some stages are
run again on a fresh machine (parked shared stages, e.g. `remote.sh fid3` then `run --only fidelity`), this script
replaces those records in the committed result, drops records the new stages supersede, and appends what was done
to "provenance". The records keep the device and machine they were computed on.

    python benchmarks/merge_stages.py --into benchmarks/results/suite_cuda.json --work <unpacked work.tgz> \\
        --stages features_test fidelity feature_dim --drop truth_noise --note "..."
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Sequence

STAGE = re.compile(r"^[a-z][a-z0-9_]*$")


def merge(into: dict, work: Path, stages: Sequence[str], drop: Sequence[str], note: str) -> dict:
    """`into` with each stage's record read from work/<stage>.json, the `drop` records removed, `note` appended."""
    for name in [*stages, *drop]:
        if not STAGE.match(name):
            raise ValueError(f"not a stage name: {name!r}")
    out = {k: v for k, v in into.items() if k not in set(drop)}
    for name in stages:
        path = work / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: stage {name} was not computed in that work folder")
        out[name] = json.loads(path.read_text())
    out["provenance"] = f"{into.get('provenance', '')}; {note}".lstrip("; ")
    out["complete"] = complete(out)
    return out


def complete(res: dict) -> bool:
    """Does the result hold every stage of a full suite run, for every seed of its arguments?"""
    seeds = res.get("args", {}).get("seeds", [])
    per_seed = [f"{st}_s{k}" for st in ("all", "methods", "selection") for k in seeds]
    shared = ["zero_shot", "features", "calibration", "affinity", "choice", "fidelity", "approx", "stability"]
    return bool(seeds) and all(k in res for k in [*per_seed, *shared])


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--into", type=Path, required=True, help="the committed suite result to update in place")
    p.add_argument("--work", type=Path, required=True, help="the work folder holding the new <stage>.json files")
    p.add_argument("--stages", nargs="+", required=True)
    p.add_argument("--drop", nargs="*", default=[])
    p.add_argument("--note", required=True, help="what was run where, appended to provenance")
    a = p.parse_args(argv)
    res = merge(json.loads(a.into.read_text()), a.work, a.stages, a.drop, a.note)
    tmp = a.into.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(a.into)
    print(f"{a.into}: {', '.join(a.stages)} replaced" + (f"; {', '.join(a.drop)} dropped" if a.drop else ""))


if __name__ == "__main__":
    main()
