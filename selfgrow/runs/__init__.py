"""Machinery every selfgrow driver shares (``selfgrow run`` today, ``selfgrow pretrain`` and
the benchmarks next): run directories, metrics files, training-FLOP counting and summary
tables. Written once here; drivers import it instead of copying it.
"""

from .dirs import (
    RUN_NAME_RULE,
    check_run_name,
    check_runs_dir,
    cli_command,
    create_run_dir,
    package_versions,
    tensorboard_command,
    unique_run_dir,
    write_json,
)
from .flops import FlopMeter, arch_key, flop_counter, training_flops_per_sample
from .metrics import ScalarJsonlSink, isatty
from .summary import finite, fmt, format_table

__all__ = [
    "RUN_NAME_RULE",
    "FlopMeter",
    "ScalarJsonlSink",
    "arch_key",
    "check_run_name",
    "check_runs_dir",
    "cli_command",
    "create_run_dir",
    "finite",
    "flop_counter",
    "fmt",
    "format_table",
    "isatty",
    "package_versions",
    "tensorboard_command",
    "training_flops_per_sample",
    "unique_run_dir",
    "write_json",
]
