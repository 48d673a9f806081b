"""The continual loop's steps as plain functions; Prefect flows, DVC and `r2m run` drive them."""

from r2m.pipeline.candidate import Candidate, remerge
from r2m.pipeline.loop import LoopReport, LoopSteps, plain_steps, run_once, run_steps
from r2m.pipeline.promotion import Release, release
from r2m.pipeline.scan import Rejection, Scan, scan
from r2m.pipeline.specialists import Specialist, onboard_specialist, registered_specialists

__all__ = [
    "Candidate",
    "LoopReport",
    "LoopSteps",
    "Rejection",
    "Release",
    "Scan",
    "Specialist",
    "onboard_specialist",
    "plain_steps",
    "registered_specialists",
    "release",
    "remerge",
    "run_once",
    "run_steps",
    "scan",
]
