"""The thread policy (`r2m.threads`, docs/usage.md, "Running beside other jobs"): the CLI and the flows set
thread counts from `usable_cpus()` and passive OpenMP waiting before torch loads, a value the user
exported wins, `R2M_THREADS` overrides or switches it off, and training applies it to torch.
Each check runs in a fresh interpreter, where OpenMP has not read its environment yet."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from r2m.threads import COUNT_VARS, THREADS_ENV, WAIT_VARS, usable_cpus

REPORT = ("import os, torch; "
          "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'), "
          "os.environ.get('OPENBLAS_NUM_THREADS'), torch.get_num_threads())")


def fresh(entry: str, **env) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in (*COUNT_VARS, *WAIT_VARS, THREADS_ENV)}
    proc = subprocess.run([sys.executable, "-c", f"import {entry}; {REPORT}"], env={**clean, **env},
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.parametrize("entry", ["r2m.cli", "flows"])
def test_entry_points_set_the_policy_before_torch(entry):
    n = str(usable_cpus())
    assert fresh(entry) == ["PASSIVE", n, n, n]


def test_a_users_settings_win_and_the_policy_can_be_switched_off():
    assert fresh("r2m.cli", OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1") == ["ACTIVE", "1", "1", "1"]
    assert fresh("r2m.cli", R2M_THREADS="1") == ["PASSIVE", "1", "1", "1"]
    assert fresh("r2m.cli", R2M_THREADS="library")[:3] == ["None", "None", "None"]  # the libraries' defaults


def test_training_applies_the_thread_count_to_torch(project, params):
    """torch was given 2 threads by someone else; training resets it to the policy's count (the
    test environment's OMP_NUM_THREADS=1)."""
    from fixtures import make_generator_dataset

    from r2m.data import validate_dataset
    from r2m.models import ensure_pretrained
    from r2m.training import train_specialist

    root = project / "data" / "generators"
    dataset = validate_dataset(make_generator_dataset(root, "sq-ff", n_per_class=12, groups=4), root, params.data)
    assert os.environ["OMP_NUM_THREADS"] == "1"
    torch.set_num_threads(2)
    try:
        train_specialist([dataset], params.model_copy(update={"train": params.train.model_copy(update={"epochs": 1})}),
                         project / "s.safetensors", pretrained=ensure_pretrained(params), progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
