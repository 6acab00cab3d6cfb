"""TemplateBank: the shared templates of every (group, kind), the base coefficients, and a fingerprint.

On disk a bank is a directory holding `bank.safetensors` (templates and base coefficients, with the
config, layout, backbone fingerprint and bank fingerprint as metadata, and the backbone's name and family
for error messages) and `mimicry.json` (the report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from recast_core.config import RecastConfig
from recast_core.errors import BankError, ConfigError
from recast_core.files import write_atomic
from recast_core.fingerprint import tensors_fingerprint

BANK_FILE = "bank.safetensors"
REPORT_FILE = "mimicry.json"
BANK_FORMAT = "recast-bank"
BANK_VERSION = 1
BASE_KEY = "base_coefficients"


def template_key(kind: str, group: int) -> str:
    return f"templates.{kind}.{group}"


@dataclass(frozen=True, eq=False)
class TemplateBank:
    """Templates per (group, kind), each `(n, out, in)` or `(n, out, in, kh, kw)`, and base coefficients.

    base_coefficients is `(M, K, n)` in the plan's canonical slot order (kinds in config order, layers
    ascending). The fingerprint covers config, layout, backbone fingerprint and every tensor; the backbone's
    name and family (empty in banks saved before they were recorded) only describe it.
    """

    config: RecastConfig
    layout: dict[str, Any]
    templates: dict[str, torch.Tensor]
    base_coefficients: torch.Tensor
    backbone_fingerprint: str
    fingerprint: str
    backbone_name: str = ""
    backbone_family: str = ""

    @classmethod
    def create(
        cls,
        config: RecastConfig,
        layout: dict[str, Any],
        templates: dict[str, torch.Tensor],
        base_coefficients: torch.Tensor,
        backbone_fingerprint: str,
    ) -> TemplateBank:
        templates = {k: v.detach().to(torch.float32).contiguous() for k, v in sorted(templates.items())}
        base = base_coefficients.detach().to(torch.float32).contiguous()
        return cls(
            config=config,
            layout=layout,
            templates=templates,
            base_coefficients=base,
            backbone_fingerprint=backbone_fingerprint,
            fingerprint=_fingerprint(config, layout, templates, base, backbone_fingerprint),
        )

    def with_backbone(self, name: str, family: str) -> TemplateBank:
        """This bank recording the name and family of the backbone it was made from."""
        return replace(self, backbone_name=name, backbone_family=family)

    @property
    def num_slots(self) -> int:
        return int(self.base_coefficients.shape[0])

    @property
    def num_templates(self) -> int:
        return self.config.templates

    def template(self, kind: str, group: int) -> torch.Tensor:
        return self.templates[template_key(kind, group)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.templates.values())

    def save(self, directory: Path) -> Path:
        """Write `bank.safetensors` atomically (temp file, fsync, rename) and return its path."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = dict(self.templates)
        tensors[BASE_KEY] = self.base_coefficients
        metadata = {
            "format": BANK_FORMAT,
            "version": str(BANK_VERSION),
            "config": json.dumps(self.config.to_dict()),
            "layout": json.dumps(self.layout),
            "backbone_fingerprint": self.backbone_fingerprint,
            "fingerprint": self.fingerprint,
        }
        if self.backbone_name:
            metadata |= {"backbone": self.backbone_name, "backbone_family": self.backbone_family}
        target = directory / BANK_FILE
        write_atomic(target, save(tensors, metadata=metadata))
        return target


def _fingerprint(
    config: RecastConfig,
    layout: dict[str, Any],
    templates: dict[str, torch.Tensor],
    base: torch.Tensor,
    backbone_fp: str,
) -> str:
    header = {
        "format": BANK_FORMAT,
        "version": BANK_VERSION,
        "config": config.to_dict(),
        "layout": layout,
        "backbone": backbone_fp,
    }
    items = [(k, templates[k]) for k in sorted(templates)] + [(BASE_KEY, base)]
    return tensors_fingerprint(header, items)


def load_bank(directory: Path) -> TemplateBank:
    """Load and verify a bank directory; any inconsistency is a BankError naming it."""
    path = directory / BANK_FILE
    if not path.is_file():
        raise BankError(f"no template bank at {directory} (expected {path}); build one with `recast mimic`")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise BankError(f"template bank {path} is unreadable: {exc}") from exc
    if metadata.get("format") != BANK_FORMAT or metadata.get("version") != str(BANK_VERSION):
        raise BankError(
            f"{path} is not a recast bank of version {BANK_VERSION} "
            f"(found format={metadata.get('format')!r}, version={metadata.get('version')!r})"
        )
    try:
        config = RecastConfig.from_dict(json.loads(metadata["config"]))
        layout = json.loads(metadata["layout"])
        backbone_fp = metadata["backbone_fingerprint"]
        stored_fp = metadata["fingerprint"]
    except (KeyError, json.JSONDecodeError, ConfigError) as exc:
        raise BankError(f"template bank {path} has malformed metadata: {exc}") from exc
    if BASE_KEY not in tensors:
        raise BankError(f"template bank {path} lacks {BASE_KEY!r}")
    base = tensors.pop(BASE_KEY)
    bank = TemplateBank.create(config, layout, tensors, base, backbone_fp)
    if bank.fingerprint != stored_fp:
        raise BankError(
            f"template bank {path} is corrupt: content fingerprint {bank.fingerprint[:16]}... "
            f"does not match the stored {stored_fp[:16]}..."
        )
    return bank.with_backbone(metadata.get("backbone", ""), metadata.get("backbone_family", ""))


def write_report(directory: Path, report: dict[str, Any]) -> Path:
    """Write `mimicry.json` atomically (temp file, fsync, rename) and return its path."""
    target = directory / REPORT_FILE
    write_atomic(target, (json.dumps(report, indent=2) + "\n").encode())
    return target
