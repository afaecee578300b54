"""Overlay picture of a measurement: mask outline, fitted ellipse and the read-out, on the image."""
from __future__ import annotations

import cv2
import numpy as np

from .geometry import Ellipse
from .pipeline import Measurement

GREEN, YELLOW, RED, WHITE = (80, 220, 80), (0, 220, 255), (60, 60, 255), (255, 255, 255)


def draw_ellipse(canvas: np.ndarray, e: Ellipse, color, thickness: int = 2):
    pts = np.round(e.points(720) * 16).astype(np.int32)  # 4 fractional bits: sub-pixel accurate outline
    cv2.polylines(canvas, [pts], True, color, thickness, cv2.LINE_AA, shift=4)


def render(pixels: np.ndarray, m: Measurement, name: str = "", truth: Ellipse | None = None) -> np.ndarray:
    """BGR uint8 picture: head mask outline (green), fitted ellipse (yellow), optional truth (red)."""
    canvas = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    if m.mask.any():
        contours, _ = cv2.findContours(m.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, GREEN, 1, cv2.LINE_AA)
    if truth is not None:
        draw_ellipse(canvas, truth, RED, 1)
    if m.ellipse_px is not None:
        draw_ellipse(canvas, m.ellipse_px, YELLOW, 2)
    if m.hc_mm is not None:
        head = f"HC {m.hc_mm:.1f} mm   GA {m.ga.text}"
    elif m.hc_px is not None:
        head = f"HC {m.hc_px:.1f} px (no spacing)"
    else:
        head = "no head found"
    qc_line = f"score {m.score:.2f}   QC {m.qc_text}"
    lines = [head, qc_line]
    if m.spacing is not None:
        lines.append(f"spacing {m.spacing.col_mm:.4f} x {m.spacing.row_mm:.4f} mm ({m.spacing.source})")
    if name:
        lines.insert(0, name)
    scale = max(0.45, canvas.shape[1] / 1400)
    y = 8
    for i, text in enumerate(lines):
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(canvas, (4, y), (12 + tw, y + th + base + 6), (0, 0, 0), cv2.FILLED)
        color = RED if text is qc_line and not m.qc_ok else WHITE
        cv2.putText(canvas, text, (8, y + th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)
        y += th + base + 8
    return canvas
