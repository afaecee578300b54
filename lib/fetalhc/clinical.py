"""Clinical read-outs of a head circumference: gestational age and growth centile."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

HADLOCK_RANGE_MM = (68.0, 360.0)
INTERGROWTH_GA_RANGE = (14.0, 40.0)


@dataclass(frozen=True)
class GestationalAge:
    weeks: float | None
    valid: bool
    reason: str = ""

    @property
    def text(self) -> str:
        """'20w3d', or the reason when there is no estimate."""
        if self.weeks is None:
            return f"n/a ({self.reason})"
        days = int(round(self.weeks * 7))
        return f"{days // 7}w{days % 7}d"

    def as_dict(self) -> dict:
        return {**asdict(self), "text": self.text}


def hadlock_ga(hc_mm: float | None) -> GestationalAge:
    """Hadlock 1984: GA (weeks) = 8.96 + 0.540*HC + 0.0003*HC^3, HC in cm, fitted for HC 68-360 mm."""
    if hc_mm is None or not math.isfinite(hc_mm):
        return GestationalAge(None, False, "no HC in mm")
    lo, hi = HADLOCK_RANGE_MM
    if not lo <= hc_mm <= hi:
        return GestationalAge(None, False, f"HC {hc_mm:.1f} mm outside Hadlock range {lo:.0f}-{hi:.0f} mm")
    hc = hc_mm / 10.0
    return GestationalAge(8.96 + 0.540 * hc + 0.0003 * hc ** 3, True)


def biometry(ellipse_mm) -> dict:
    """BPD, OFD and cephalic index from the HC ellipse in mm (any object with semi-axes ``a >= b``).

    Both diameters are the fitted ellipse's axes, on the same outer skull outline the HC is measured on
    (outer-to-outer), so HC, BPD and OFD always describe one curve.
    """
    if ellipse_mm is None:
        return {"bpd_mm": None, "ofd_mm": None, "cephalic_index": None}
    bpd, ofd = 2.0 * float(ellipse_mm.b), 2.0 * float(ellipse_mm.a)
    return {"bpd_mm": bpd, "ofd_mm": ofd, "cephalic_index": 100.0 * bpd / ofd if ofd > 0 else None}


def intergrowth_hc(ga_weeks: float) -> tuple[float, float]:
    """INTERGROWTH-21st fetal HC (Papageorghiou 2014): mean and SD in mm at ``ga_weeks``."""
    lo, hi = INTERGROWTH_GA_RANGE
    if not lo <= ga_weeks <= hi:
        raise ValueError(f"INTERGROWTH-21st HC standard covers GA {lo:.0f}-{hi:.0f} weeks, got {ga_weeks}")
    g, lg = ga_weeks, math.log(ga_weeks)
    mu = -28.2849 + 1.69267 * g ** 2 - 0.397485 * g ** 2 * lg
    sigma = 1.98735 + 0.0136772 * g ** 3 - 0.00726264 * g ** 3 * lg + 0.000976253 * g ** 3 * lg ** 2
    return mu, sigma


def hc_centile(hc_mm: float, ga_weeks: float) -> dict:
    """z-score and centile of an HC for a known GA (from dating scan / LMP)."""
    mu, sigma = intergrowth_hc(ga_weeks)
    z = (hc_mm - mu) / sigma
    return {"ga_weeks": ga_weeks, "mean_mm": mu, "sd_mm": sigma, "z": z,
            "centile": 50.0 * (1.0 + math.erf(z / math.sqrt(2.0)))}
