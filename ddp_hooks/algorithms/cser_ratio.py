"""CSER's overall compression ratio and configurations that reach a target ratio."""

from typing import Any

from ..core import check_float


def overall_ratio(grad_ratio: float | None, model_ratio: float, period: float) -> float:
    """``RC = 1 / [1 / (model_ratio * period) + 1 / grad_ratio]`` (``grad_ratio=None``: no sync)."""
    grad_term = 0.0 if grad_ratio is None else 1.0 / grad_ratio
    return 1.0 / (1.0 / (model_ratio * period) + grad_term)


def propose(target: float, model_ratios: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> list[dict[str, Any]]:
    """Configurations with overall ratio ``target``, splitting the budget equally between the two
    synchronizations (the released ImageNet configurations do): ``grad_ratio = 2 * target`` and
    ``model_ratio * period = 2 * target``; plus CSEA and CSER-PL for comparison."""
    target = check_float("target", target, 1.0)
    out = []
    for model_ratio in model_ratios:
        period = 2 * target / model_ratio
        if period >= 1 and float(period).is_integer():
            cfg = {"grad_ratio": 2 * target, "model_ratio": model_ratio, "period": int(period)}
            ratio = overall_ratio(2 * target, model_ratio, int(period))
            out.append({**cfg, "variant": "CSER", "ratio": ratio})
    out.append({"grad_ratio": None, "model_ratio": target, "period": 1, "variant": "CSEA", "ratio": target})
    for period in (4, 8, 16, 32):
        if target / period >= 1:
            out.append(
                {
                    "grad_ratio": None,
                    "model_ratio": target / period,
                    "period": period,
                    "variant": "CSER-PL",
                    "ratio": target,
                }
            )
    return out
