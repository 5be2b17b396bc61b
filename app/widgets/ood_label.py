"""A small label: how typical the input is for the model (its out-of-distribution score)."""
from __future__ import annotations

import math

from PySide6.QtWidgets import QLabel, QWidget

from ...core.ood import OodScore

PLAIN_STYLE = "color: #555555; padding: 2px 6px;"
WARNING_STYLE = ("color: #7a1f00; background: #ffe2cc; border: 1px solid #d65f28; border-radius: 3px; "
                 "padding: 2px 6px; font-weight: bold;")


def percentile_text(percentile: float) -> str:
    """A percentile for the label: whole numbers in the middle, one decimal in the tails,
    rounded towards 50 so that an unflagged input never reads as past a warning line
    (99.95 is not "100", 0.04 not "0")."""
    if 1 <= percentile <= 99:
        return f"{percentile:.0f}"
    tenths = math.floor(percentile * 10) if percentile > 50 else math.ceil(percentile * 10)
    return f"{tenths / 10:.1f}"


class OodLabel(QLabel):
    """Shows an :class:`OodScore`: bits/dim and the percentile among the model's
    validation images, in a warning style when the input is out of distribution."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.score: OodScore | None = None
        self.clear_score()

    @property
    def warning(self) -> bool:
        """Whether the label shows an out-of-distribution warning."""
        return bool(self.score is not None and self.score.out_of_distribution)

    def clear_score(self, text: str = "") -> None:
        """No score (yet); ``text`` says why (e.g. that one is being computed)."""
        self.score = None
        self.setText(text)
        self.setToolTip("")
        self.setStyleSheet(PLAIN_STYLE)

    def show_score(self, score: OodScore) -> None:
        self.score = score
        bpd = f"{score.bits_per_dim:.2f} bits/dim"
        if score.percentile is None:
            self.setText(f"Likelihood: {bpd} ({score.note})")
            self.setToolTip("The model card holds no reference distribution of this score on validation "
                            "images (rdc ood-calibrate adds one), so typical and unusual inputs cannot be told apart.")
        elif score.out_of_distribution:
            self.setText(f"⚠ Out of distribution: {bpd}, percentile {score.percentile:.1f} of validation")
            self.setToolTip(f"The prediction may mean little: {score.warning}.")
        else:
            self.setText(f"In distribution: {bpd}, percentile {percentile_text(score.percentile)} of validation")
            self.setToolTip("How likely the diffusion model finds the input (an upper bound on -log2 p per "
                            "pixel), placed among the model's validation images.")
        self.setToolTip(f"{self.text()}\n\n{self.toolTip()}")  # the whole text where a narrow window cuts it
        self.setStyleSheet(WARNING_STYLE if self.warning else PLAIN_STYLE)
