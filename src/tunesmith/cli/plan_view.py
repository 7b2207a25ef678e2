"""How `tunesmith plan` shows memory plans: a table per mode and a verdict, or JSON for scripts."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

GIB = 1024**3


def print_plans(plans, device, config) -> None:
    """One column per mode, one row per memory component, then whether each fits the device."""
    console = Console()
    console.print(f"[bold]memory plan[/] {config.base_model}: {config.train.method}, batch {config.train.batch_size} x "
                  f"{config.data.max_length} tokens, on {device.label}", soft_wrap=True, highlight=False)
    table = Table("component", *(plan.mode for plan in plans))
    for component in plans[0].components:
        table.add_row(component, *(_gib(plan.components[component]) for plan in plans))
    table.add_row("[bold]total", *(f"[bold]{_gib(plan.total)}" for plan in plans))
    table.add_row("trainable params", *(f"{plan.trainable:,}" for plan in plans))
    table.add_row("fits", *(_verdict(plan.fits) for plan in plans))
    console.print(table)
    for plan in plans:
        for note in plan.notes:
            console.print(f"  {plan.mode}: {note}")


def plans_json(plans, device) -> str:
    return json.dumps({
        "device": {"kind": device.kind, "memory_bytes": device.memory},
        "plans": [{"mode": p.mode, "total_bytes": p.total, "components_bytes": p.components, "trainable": p.trainable,
                   "fits": p.fits, "notes": p.notes} for p in plans],
    }, indent=2)


def _gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def _verdict(fits: bool | None) -> str:
    return "?" if fits is None else ("[green]yes" if fits else "[red]no")
