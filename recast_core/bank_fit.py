"""Whether a template bank was made for a backbone: its layout and the backbone fingerprint it records
(every weight the bank does not replace) must be the backbone's. A bank made for another backbone is a
BankError naming both, never a model that silently computes something else."""

from __future__ import annotations

from pathlib import Path

from recast_core.backbone import TextBackbone
from recast_core.bank import TemplateBank
from recast_core.errors import BankError, PlanError
from recast_core.fingerprint import backbone_fingerprint
from recast_core.plan import resolve_plan
from recast_core.reparam import planned_weight_names

__all__ = ["check_bank_fits"]


def check_bank_fits(bank: TemplateBank, backbone: TextBackbone, source: Path | str | None = None) -> None:
    """BankError unless `bank` (read from `source`) was made from `backbone`."""
    found: str | None = None
    try:
        plan = resolve_plan(backbone.model, bank.config)
        if plan.describe() == bank.layout:
            found = backbone_fingerprint(backbone.model, planned_weight_names(plan))
    except PlanError:
        pass
    if found == bank.backbone_fingerprint:
        return
    made_for = (
        f"backbone {bank.backbone_name} ({bank.backbone_family}, " if bank.backbone_name else "a backbone ("
    )
    made_for += f"fingerprint {bank.backbone_fingerprint[:16]})"
    this = f"{backbone.name} ({backbone.family}" + (
        f", fingerprint {found[:16]})" if found else ", another layout)"
    )
    where = f" {source}" if source is not None else ""
    raise BankError(
        f"the template bank{where} was made for {made_for}, not for the backbone in use, {this}; use the "
        "backbone it was made for (--backbone DIR or RECAST_BACKBONE) or make a bank for this one "
        "(recast mimic --backbone DIR --out BANK)"
    )
