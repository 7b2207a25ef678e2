"""The one overfitting rule, on loss curves: evaluation reads the manifest's (every method records them under the same
names); training warns by it as the curves grow (`LoopProgress.note_overfitting`)."""

from __future__ import annotations


def overfitting_check(train_section: dict, tolerance: float) -> dict:
    """Flag when validation loss ends `tolerance` above its best while training loss kept falling after that step.

    Works from `train.loss_curve` and `train.validation_curve` (lists of {step, loss}); without a
    validation curve the verdict is `unknown` and only the training curve is returned.
    """
    train_curve = [point for point in train_section.get("loss_curve") or [] if "loss" in point]
    validation_curve = [point for point in train_section.get("validation_curve") or [] if "loss" in point]
    result = {"train_curve": train_curve, "validation_curve": validation_curve, "tolerance": tolerance}
    if len(validation_curve) < 2 or not train_curve:
        return {**result, "status": "unknown", "overfitting": False,
                "message": "the run recorded no validation curve (at least 2 points needed), so divergence cannot be checked"}
    best = min(validation_curve, key=lambda p: p["loss"])
    final = validation_curve[-1]
    rise = (final["loss"] - best["loss"]) / max(best["loss"], 1e-12)
    train_at_best = _loss_at(train_curve, best["step"])
    train_final = train_curve[-1]["loss"]
    diverging = final["step"] > best["step"] and rise > tolerance and train_final < train_at_best
    message = (f"validation loss rose {rise:.0%} from its best {best['loss']:.4f} at step {best['step']} to "
               f"{final['loss']:.4f} at step {final['step']} while training loss fell {train_at_best:.4f} -> {train_final:.4f}"
               if diverging else
               f"validation loss ends within {tolerance:.0%} of its best ({final['loss']:.4f} vs {best['loss']:.4f} "
               f"at step {best['step']})" if rise <= tolerance else
               f"validation loss rose {rise:.0%} from its best, but training loss did not keep falling")
    return {**result, "status": "diverging" if diverging else "ok", "overfitting": diverging,
            "best_step": best["step"], "best_validation_loss": best["loss"], "final_validation_loss": final["loss"],
            "relative_rise": rise, "message": message}


def _loss_at(curve: list[dict], step: int) -> float:
    """Training loss at the logged step closest to `step`."""
    return min(curve, key=lambda p: abs(p["step"] - step))["loss"]
