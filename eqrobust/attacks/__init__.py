"""Adversarial attacks in pure JAX: PGD, APGD, FAB, Square, C&W-L2 and AutoAttack."""

from eqrobust.attacks._common import AttackResult
from eqrobust.attacks.apgd import apgd
from eqrobust.attacks.autoattack import AutoAttackResult, autoattack
from eqrobust.attacks.cw import CWResult, cw_l2
from eqrobust.attacks.driver import run_attack
from eqrobust.attacks.fab import fab
from eqrobust.attacks.pgd import pgd
from eqrobust.attacks.square import SquareResult, square

__all__ = [
    "AttackResult",
    "AutoAttackResult",
    "CWResult",
    "SquareResult",
    "apgd",
    "autoattack",
    "cw_l2",
    "fab",
    "pgd",
    "run_attack",
    "square",
]
