"""Cost accounting: analytic FLOPs of static layers and the per-sample cost ledger."""

from dynaneural.compute.flops import FlopsReport, count_flops, register_flops_rule, static_flops
from dynaneural.compute.ledger import CostLedger

__all__ = ["FlopsReport", "count_flops", "register_flops_rule", "static_flops", "CostLedger"]
