"""Membership-inference attacks: pure functions on score arrays, their registry, threat models, the loop."""

from .lira import global_threshold, lira_offline, lira_online
from .registry import ATTACKS, AttackInput
from .rmia import rmia_offline, rmia_online
from .run import ShadowSet, attack_inputs, leave_one_out, run_attacks
from .threats import THREAT_MODELS, ThreatModel

__all__ = ["ATTACKS", "THREAT_MODELS", "AttackInput", "ShadowSet", "ThreatModel", "attack_inputs", "global_threshold",
           "leave_one_out", "lira_offline", "lira_online", "rmia_offline", "rmia_online", "run_attacks"]
