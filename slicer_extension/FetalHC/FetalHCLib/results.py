"""What the panel and the results table show of a measurement (fetalhc Result), and where it is kept
on the volume (attributes holding Result.to_dict() JSON, saved with the scene)."""
from __future__ import annotations

import json
import math

import vtk

from .nodes import ATTR_RESULT, REF_TABLE, referenced
from .shared import result as fresult


def store_result(volume, res, attribute: str = ATTR_RESULT) -> None:
    volume.SetAttribute(attribute, json.dumps(res.to_dict(), default=float))


def stored_result(volume, attribute: str = ATTR_RESULT):
    text = volume.GetAttribute(attribute)
    return fresult.Result.from_dict(json.loads(text)) if text else None


def _num(v, fmt):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _ordinal(centile: float) -> str:
    if centile < 1 or centile > 99:
        return "<1st" if centile < 1 else ">99th"
    n = int(round(centile))
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def result_rows(res) -> list[tuple[str, str]]:
    """(quantity, value) lines shown in the panel and stored in the table."""
    hc_text = f"{res.hc_mm:.1f} mm" if res.hc_mm is not None else (
        f"{res.hc_px:.1f} px (no spacing)" if res.hc_px is not None else "no head found")
    bio = res.biometry()
    ga = res.ga.text + (f" ({res.ga.weeks:.1f} weeks)" if res.ga.weeks is not None else "")
    centile = "n/a (enter the known GA)" if res.centile is None else (
        f"{_ordinal(res.centile['centile'])} (z {res.centile['z']:+.2f}) at {res.centile['ga_weeks']:g} w, INTERGROWTH-21st")
    sp = res.spacing
    rows = [("HC", hc_text), ("BPD", _num(bio["bpd_mm"], ".1f") + " mm"), ("OFD", _num(bio["ofd_mm"], ".1f") + " mm"),
            ("Cephalic index", _num(bio["cephalic_index"], ".1f")), ("GA (Hadlock)", ga),
            ("HC centile", centile), ("QC", qc_line(res)),
            ("Score", _num(res.score, ".3f")), ("Outline", res.outline_source),
            ("Pixel spacing", f"{sp.col_mm:.4f} x {sp.row_mm:.4f} mm (col x row)" if sp else "unknown"),
            ("Spacing source", sp.source if sp else "none"),
            ("Model version", res.model_version or "n/a"),
            ("Curve length", _num(res.extra.get("curve_length_mm"), ".1f") + " mm")]
    return rows + [("Warning", w) for w in res.extra.get("warnings") or []]


def qc_line(res) -> str:
    if res.qc_ok is None:
        return f"not re-run on the {res.outline_source} outline" + (f" ({res.qc_text})" if res.qc_reasons else "")
    return "OK" if res.qc_ok else f"FAILED: {res.qc_text}"


def update_table(volume, res):
    table = referenced(volume, REF_TABLE, "vtkMRMLTableNode", f"{volume.GetName()} FetalHC results")
    table.RemoveAllColumns()
    rows = result_rows(res)
    for title, values in (("Measurement", [r[0] for r in rows]), ("Value", [r[1] for r in rows])):
        col = vtk.vtkStringArray()
        col.SetName(title)
        for v in values:
            col.InsertNextValue(v)
        table.AddColumn(col)
    table.SetUseColumnTitleAsColumnHeader(True)
    table.Modified()
    return table


def table_values(volume) -> dict[str, str]:
    table = volume.GetNodeReference(REF_TABLE)
    if table is None:
        return {}
    return {table.GetCellText(r, 0): table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())}
