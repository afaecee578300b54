import pytest

from fetalhc.clinical import hadlock_ga, hc_centile, intergrowth_hc


def test_hadlock_formula_in_cm():
    hc_mm = 175.0
    hc = 17.5
    ga = hadlock_ga(hc_mm)
    assert ga.valid and ga.weeks == pytest.approx(8.96 + 0.540 * hc + 0.0003 * hc ** 3)
    assert ga.weeks == pytest.approx(20.018, abs=1e-3)
    assert ga.text == "20w0d"
    assert hadlock_ga(250.0).text == "27w1d"  # 27.15 weeks


@pytest.mark.parametrize("hc", [50.0, 67.9, 360.1, 500.0, None, float("nan")])
def test_hadlock_outside_range_gives_no_ga_with_reason(hc):
    ga = hadlock_ga(hc)
    assert ga.weeks is None and not ga.valid and ga.reason
    assert "n/a" in ga.text


def test_intergrowth_reference_values():
    mu, sd = intergrowth_hc(20.0)
    assert mu == pytest.approx(172.5, abs=0.1)
    assert sd == pytest.approx(7.44, abs=0.01)
    c = hc_centile(mu, 20.0)
    assert c["z"] == pytest.approx(0.0, abs=1e-9) and c["centile"] == pytest.approx(50.0)
    assert hc_centile(mu + sd, 20.0)["centile"] == pytest.approx(84.13, abs=0.01)
    with pytest.raises(ValueError):
        intergrowth_hc(41.0)


def test_biometry_is_the_hc_ellipse_axes():
    from fetalhc.clinical import biometry
    from fetalhc.geometry import Ellipse

    b = biometry(Ellipse.make(0, 0, 40.0, 50.0, 0.3))  # semi-axes in mm, given in either order
    assert b["ofd_mm"] == pytest.approx(100.0) and b["bpd_mm"] == pytest.approx(80.0)
    assert b["cephalic_index"] == pytest.approx(80.0)
    assert biometry(None) == {"bpd_mm": None, "ofd_mm": None, "cephalic_index": None}
