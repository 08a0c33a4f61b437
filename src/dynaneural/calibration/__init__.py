"""Calibration of dynamic decisions to a compute or latency budget."""

from dynaneural.calibration.exits import (
    CalibrationResult,
    ExitStatistics,
    assign_exits,
    calibrate_exits,
    collect_exit_statistics,
    cost_model,
    measure_latency_profile,
)

__all__ = ["CalibrationResult", "ExitStatistics", "assign_exits", "calibrate_exits", "collect_exit_statistics",
           "cost_model", "measure_latency_profile"]
