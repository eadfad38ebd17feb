"""The one record of what rankcut knows of a model and did to it.

A Hugging Face model has nowhere to keep rankcut's facts about it: where it was loaded from,
its tokenizer, the config it was compressed with, each targeted module's form and rank, the
speed decisions taken on this machine, and any learned-rank or healing run. They travel with
the model as one typed `ModelRecord` in the model's own attribute dictionary (so a deep copy of
the model copies it), read and written only through `record_of`. `rankcut.save` writes its
sections into `rankcut.json` and `rankcut.load` reads them back, unchanged in layout from the
format's first version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

ATTRIBUTE = "rankcut_record"

# manifest keys the record holds in its own fields; the header keys (format, weights, ...) are
# the saved folder's, not the model's
_FIELDS = ("config", "modules", "budget", "speed", "speed_limits", "softrank", "healed", "channels", "attention")
_HEADER = frozenset({"format", "format_version", "rankcut_version", "source_model", "model_class", "dtype",
                     "weights", "params", "bytes"})


@dataclass
class ModelRecord:
    """What rankcut knows of one model (see the module docstring)."""

    source: str | None = None  # what `load_model` was given: a zoo alias, folder, file or hub id
    tokenizer: Any = None
    config: dict[str, Any] | None = None  # the method config `compress_` was called with, as `to_dict`
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # module name → its manifest entry
    budget: dict[str, Any] | None = None  # a two-pass budget's fraction and passes
    speed: dict[str, Any] | None = None  # `speed_up_`'s decisions and the machine they were timed on
    speed_limits: dict[str, int] | None = None  # shape → highest rank faster than dense, when a budget used them
    softrank: dict[str, Any] | None = None  # a learned-ranks run's task, settings and starting ranks
    healed: dict[str, Any] | None = None  # a healing run's task, teacher and steps
    channels: dict[str, Any] | None = None  # MLP channels cut jointly: method, keep, sizes before and after
    attention: dict[str, Any] | None = None  # attention head channels cut jointly: keep, channels per head
    other: dict[str, Any] = field(default_factory=dict)  # manifest sections this version does not know

    def manifest_sections(self) -> dict[str, Any]:
        """The sections `rankcut.json` stores for this record, besides the folder's header."""
        out: dict[str, Any] = {"modules": self.modules}
        for name in _FIELDS:
            value = getattr(self, name)
            if name != "modules" and value is not None:
                out[name] = value
        return {**out, **self.other}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], tokenizer: Any = None) -> ModelRecord:
        known = {name: manifest[name] for name in _FIELDS if name in manifest}
        other = {k: v for k, v in manifest.items() if k not in _HEADER and k not in _FIELDS}
        return cls(source=manifest.get("source_model"), tokenizer=tokenizer, other=other, **known)


def record_of(model: nn.Module) -> ModelRecord:
    """The model's record, attached empty on first use."""
    record = model.__dict__.get(ATTRIBUTE)
    if record is None:
        record = ModelRecord()
        model.__dict__[ATTRIBUTE] = record
    return record


def set_record(model: nn.Module, record: ModelRecord) -> None:
    model.__dict__[ATTRIBUTE] = record
