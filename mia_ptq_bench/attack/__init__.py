"""Membership-inference attacks: pure functions on score arrays, a registry, and the leave-one-out loop."""

from .lira import global_threshold, lira_offline, lira_online
from .registry import ATTACKS
from .run import leave_one_out, run_attacks

__all__ = ["ATTACKS", "global_threshold", "leave_one_out", "lira_offline", "lira_online", "run_attacks"]
