"""What a job is, read from its resolved config: network, sampler, loss and switches, and its name.

:data:`SWITCHES` are the keys that make one RIM variant differ from another, read from the table
of config keys (:data:`experiments.keys.KEYS`, field ``variant``); the W&B
loggers (config columns, run names) and the sweep report (grouping, pairing, table rows) both read it
through :func:`describe`, so a run is called the same thing everywhere:

- ``PSPNet``: the baseline (the whole schedule on the natural distribution, cross-entropy);
- ``PSPNet+ARBS`` / ``PSPNet+NRBS``: stage 2 with a regional sampler, cross-entropy;
- ``PSPNet+ILM``: stage 2 with the inter-class loss, no sampler;
- ``RIM(PSPNet)``: ARBS + ILM; ``PSPNet+NRBS+ILM``: NRBS + ILM;
- ``PSPNet (frozen encoder, CE)``: stage 2 with neither;
- a switch whose value differs from its config-file default is appended in brackets:
  ``RIM(PSPNet) [cpa=precision]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.keys import KEYS

CONF = Path(__file__).resolve().parents[1] / "conf"
NOT_RECORDED = "not recorded"
#: Fits a job makes: shared stage 1, the shared baseline, RIM's stage 2, a one-stage run.
ROLES = ("stage1", "baseline", "stage2", "train")
# model._target_'s class name -> the paper's spelling.
NETWORK_NAMES = {
    "PSPNet": "PSPNet",
    "DeepLabV3Plus": "DeepLabv3+",
    "DANet": "DANet",
    "CE2P": "CE2P",
}


@dataclass(frozen=True)
class Switch:
    """One key that tells variants apart.

    Attributes:
        column: its name in tables, W&B config columns and name brackets.
        key: dotted path in the resolved job config.
        default_file: config file (below ``conf/``, ``{source}`` = the sampler source) whose value of
            ``key`` counts as the default; None: no default, the key shows in a name only where a
            sweep varies it.
        needs: the variant parts the switch acts on ("sampler", "ilm", "stage2"); it reads n/a
            elsewhere, so e.g. every baseline has the same ``cpa``.
    """

    column: str
    key: str
    default_file: str | None = None
    needs: tuple[str, ...] = ()


SWITCHES: tuple[Switch, ...] = tuple(
    Switch(k.variant, dotted, k.variant_default, k.variant_needs)
    for dotted, k in KEYS.items()
    if k.variant is not None and not k.variant_info
)
# Recorded as W&B columns and in the report's settings table, never part of a name: both MPA
# readings are always reported, whatever MPA itself averages.
INFO_SWITCHES: tuple[Switch, ...] = tuple(
    Switch(k.variant, dotted, k.variant_default, k.variant_needs)
    for dotted, k in KEYS.items()
    if k.variant is not None and k.variant_info
)


def select(cfg: Any, key: str) -> Any:
    """``cfg``'s value at dotted ``key`` (a DictConfig or plain dict); None when absent or when its
    interpolation does not resolve outside the job (``${hydra:...}``)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg or {})
    try:
        value = OmegaConf.select(node, key, default=None, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 - a resolver that raises: treat as not recorded
        return None
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=False)
    return value


@cache
def _file_default(path: str, key: str) -> Any:
    file = CONF / path
    if not file.is_file():
        return None
    return OmegaConf.select(OmegaConf.load(file), key, default=None)


def _short(value: Any) -> Any:
    # "losses.CrossEntropyLoss" -> "CrossEntropyLoss": class paths read better in names and columns.
    if isinstance(value, str) and value.count(".") >= 1 and value.split(".")[-1][:1].isupper():
        return value.split(".")[-1]
    return value


@dataclass(frozen=True)
class Variant:
    """What one fit of a job is.

    Attributes:
        role: one of :data:`ROLES`.
        network: display name (``PSPNet``, ``DeepLabv3+``, ``DANet``).
        sampler: ``arbs``, ``nrbs`` or None.
        ilm: whether the inter-class loss is on.
        schedule: ``rim`` or ``single``.
        seed: the job's seed.
        switches: ``column -> value`` for every :data:`SWITCHES` entry (None: not recorded or n/a).
        defaults: ``column -> default`` for the switches that have one.
        info: ``column -> value`` of :data:`INFO_SWITCHES`.
    """

    role: str
    network: str
    sampler: str | None
    ilm: bool
    schedule: str
    seed: int | None
    switches: tuple[tuple[str, Any], ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()
    info: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @property
    def method(self) -> str:
        """The variant's name without brackets (``RIM(PSPNet)``)."""
        net = self.network
        if self.role == "stage1":
            return f"{net} stage 1"
        if self.role == "baseline":
            return net
        sampler = self.sampler.upper() if self.sampler else None
        if sampler == "ARBS" and self.ilm:
            return f"RIM({net})"
        parts = [net, *([sampler] if sampler else []), *(["ILM"] if self.ilm else [])]
        if len(parts) == 1:
            return f"{net} (frozen encoder, CE)" if self.role == "stage2" else net
        return "+".join(parts)

    def non_default(self) -> dict[str, Any]:
        """The switches whose value differs from their config-file default (and is recorded)."""
        defaults = dict(self.defaults)
        out = {}
        for column, value in self.switches:
            if column in defaults and value is not None and value != defaults[column]:
                out[column] = value
        if self.role == "train" and self.schedule != "rim":
            out["schedule"] = self.schedule
        return out

    def name(self, extra: Mapping[str, Any] | None = None) -> str:
        """``RIM(PSPNet) [cpa=precision]``: the method and its non-default switches (plus
        ``extra``, e.g. the switches a sweep varies)."""
        brackets = {**self.non_default(), **(extra or {})}
        if not brackets:
            return self.method
        return f"{self.method} [{', '.join(f'{k}={_fmt(v)}' for k, v in brackets.items())}]"

    def columns(self) -> dict[str, Any]:
        """W&B config columns: variant, network, seed, role and every switch ("not recorded" when the
        key is absent from the config, "n/a" where it does not act)."""
        out: dict[str, Any] = {
            "variant": self.name(),
            "method": self.method,
            "network": self.network,
            "seed": self.seed,
            "stage": self.role,
            "sampler": self.sampler or "none",
            "ilm": self.ilm,
            "schedule": self.schedule,
        }
        acting = self._acting()
        for switch in (*SWITCHES, *INFO_SWITCHES):
            value = dict(self.switches).get(switch.column, dict(self.info).get(switch.column))
            if not acting(switch):
                out[switch.column] = "n/a"
            else:
                out[switch.column] = NOT_RECORDED if value is None else value
        return out

    def _acting(self) -> Any:
        parts = {"sampler": self.sampler is not None, "ilm": self.ilm}
        parts["stage2"] = self.role == "stage2" or (
            self.role == "train" and (parts["sampler"] or parts["ilm"])
        )
        return lambda s: all(parts[n] for n in s.needs)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(cfg: Any, role: str) -> Variant:
    """The :class:`Variant` of one fit of the job whose resolved config is ``cfg``.

    Args:
        cfg: the job's config (DictConfig, or the plain dict of ``.hydra/config.yaml``).
        role: which fit: ``stage1`` and ``baseline`` are the shared plain runs (no sampler, no ILM,
            whatever the job's stage 2 uses); ``stage2`` and ``train`` use the job's sampler and loss.
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r}: expected one of {', '.join(ROLES)}")
    target = str(select(cfg, "model._target_") or "unknown")
    cls = target.rsplit(".", 1)[-1]
    network = NETWORK_NAMES.get(cls, cls)
    plain = role in ("stage1", "baseline")
    sampler_cfg = select(cfg, "sampler")
    source = select(cfg, "sampler.source") if isinstance(sampler_cfg, dict) else None
    sampler = None if plain or not source else str(source)
    ilm = not plain and select(cfg, "loss.ilm") is not None
    seed = select(cfg, "seed")
    variant = Variant(role, network, sampler, ilm, str(select(cfg, "schedule.name")), seed)
    acting = variant._acting()
    switches, defaults = [], []
    for switch in SWITCHES:
        value = _short(select(cfg, switch.key)) if acting(switch) else None
        switches.append((switch.column, value))
        if switch.default_file is not None and acting(switch):
            path = switch.default_file.format(source=sampler or "arbs")
            default = _short(_file_default(path, switch.key.split(".", 1)[1]))
            if default is not None:
                defaults.append((switch.column, default))
    info = tuple((s.column, select(cfg, s.key) or select(cfg, "module.mpa")) for s in INFO_SWITCHES)
    return Variant(
        role,
        network,
        sampler,
        ilm,
        variant.schedule,
        seed,
        tuple(switches),
        tuple(defaults),
        info,
    )
