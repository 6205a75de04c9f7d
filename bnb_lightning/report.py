"""`QuantizationReport`: what quantization did to each module, as figures and as a table."""

from __future__ import annotations

from dataclasses import dataclass, field

CONVERTED = "converted"
SKIPPED = "skipped"
ALREADY_QUANTIZED = "already quantized"


@dataclass(frozen=True)
class ModuleReport:
    """One linear layer: what happened to it and why, with its bytes before and after."""

    name: str
    layer_type: str
    action: str
    reason: str
    bytes_before: int
    bytes_after: int


@dataclass
class QuantizationReport:
    """Returned by :func:`bnb_lightning.quantize_model`; ``print(report)`` shows a table."""

    bits: int
    quant_type: str | None
    device: str
    dry_run: bool = False
    seconds: float = 0.0
    modules: list[ModuleReport] = field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        return [m.name for m in self.modules if m.action == CONVERTED]

    @property
    def skipped(self) -> dict[str, str]:
        """Module name -> reason it was kept in full precision."""
        return {m.name: m.reason for m in self.modules if m.action == SKIPPED}

    @property
    def already_quantized(self) -> list[str]:
        return [m.name for m in self.modules if m.action == ALREADY_QUANTIZED]

    @property
    def bytes_before(self) -> int:
        return sum(m.bytes_before for m in self.modules)

    @property
    def bytes_after(self) -> int:
        return sum(m.bytes_after for m in self.modules)

    def summary(self) -> str:
        """One line: counts, memory of the linear layers before and after, time."""
        scheme = f"{self.bits}-bit {self.quant_type}" if self.bits == 4 else "8-bit LLM.int8"
        verb = "would convert" if self.dry_run else "converted"
        line = (
            f"bnb_lightning: {verb} {len(self.converted)} linear layers to {scheme} on {self.device}, "
            f"kept {len(self.skipped)} in full precision"
        )
        if self.already_quantized:
            line += f", {len(self.already_quantized)} already quantized"
        line += f"; linear weights {_format_bytes(self.bytes_before)} -> {_format_bytes(self.bytes_after)}"
        if not self.dry_run:
            line += f" in {self.seconds:.2f} s"
        return line

    def compact(self) -> str:
        """The table grouped by what happened and why: a few lines even for hundreds of layers."""
        groups: dict[tuple[str, str, str], list[ModuleReport]] = {}
        for m in self.modules:
            groups.setdefault((m.action, m.reason, m.layer_type), []).append(m)
        rows = [
            (action, reason, layer_type, str(len(members)), *_sizes(members))
            for (action, reason, layer_type), members in groups.items()
        ]
        return _table(("action", "reason", "type", "layers", "before", "after"), rows, self.summary())

    def __str__(self) -> str:
        rows = [(m.name, m.layer_type, m.action, m.reason, *_sizes([m])) for m in self.modules]
        return _table(("module", "type", "action", "reason", "before", "after"), rows, self.summary())


def _sizes(members: list[ModuleReport]) -> tuple[str, str]:
    return (
        _format_bytes(sum(m.bytes_before for m in members)),
        _format_bytes(sum(m.bytes_after for m in members)),
    )


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], footer: str) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join([*lines, footer])


def _format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
