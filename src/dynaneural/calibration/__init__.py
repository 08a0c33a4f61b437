"""Calibration of dynamic decisions to a compute or latency budget."""

from dynaneural.calibration.controller import ControllerState, ExitBudgetController
from dynaneural.calibration.exits import (
    CalibrationResult,
    ExitStatistics,
    assign_exits,
    calibrate_exits,
    collect_exit_statistics,
    cost_model,
    measure_latency_profile,
)
from dynaneural.calibration.thresholds import KnobCalibration, calibrate_knob

__all__ = ["ControllerState", "ExitBudgetController", "CalibrationResult", "KnobCalibration", "calibrate_knob", "ExitStatistics", "assign_exits", "calibrate_exits", "collect_exit_statistics",
           "cost_model", "measure_latency_profile"]
