"""The report's line on ``auto`` precision: what the machine's probe chose, and by which figures.

Read from the training record's ``precision_probe`` (``PrecisionProbe.to_dict()``), so a
report can be rendered from ``report.json`` alone, without torch.
"""

from __future__ import annotations


def precision_markdown(kd: dict) -> list[str]:
    """One bullet for the distillation section; none when no setting was ``auto`` (or an older record)."""
    probe = kd.get("precision_probe")
    if not probe:
        return []
    if not probe.get("supported"):
        return [f"- `auto` precision: {probe['choice']} on {probe['device']} ({probe['rule']})"]
    rates = "; ".join(
        f"{shape.replace('x', ' × ')}: bfloat16 {r['bfloat16']:.0f} vs float32 {r['float32']:.0f} GFLOP/s "
        f"({r['bfloat16'] / r['float32']:.2f}x)"
        for shape, r in probe["gflops"].items()
    )
    return [
        f"- `auto` precision: {probe['choice']}, by a {probe['seconds']:.1f} s matmul probe on {probe['device']} "
        f"({probe['threads']} threads, torch {probe['torch_version']}): {rates}; rule: {probe['rule']}"
    ]
