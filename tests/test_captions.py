"""Caption cleaning (PixArt's clean_caption=True): refused when asked for without bs4/ftfy, a single
warning (and clean_caption=false in the protocol) when only the family's default asks for it."""

import importlib.util

import pytest

from sensitivity import captions
from sensitivity.cli import main
from sensitivity.errors import SensitivityError

HAS_CAPTIONS = all(importlib.util.find_spec(m) is not None for m in captions.CAPTION_PACKAGES)


@pytest.fixture
def without_packages(monkeypatch):
    monkeypatch.setattr(captions, "missing_caption_packages", lambda: ["beautifulsoup4", "ftfy"])
    monkeypatch.setattr(captions, "_warned", False)


@pytest.fixture
def with_packages(monkeypatch):
    monkeypatch.setattr(captions, "missing_caption_packages", lambda: [])
    monkeypatch.setattr(captions, "_warned", False)


def test_explicit_request_without_the_packages_is_refused(without_packages, tmp_path, capsys):
    with pytest.raises(SensitivityError, match=r"beautifulsoup4 and ftfy .*sensitivity\[captions\]"):
        captions.check_clean_caption({"clean_caption": True})
    captions.check_clean_caption({"clean_caption": False})
    captions.check_clean_caption({"clean_caption": "false"})
    # from the command line: one line, exit 2, before any model is loaded or file written
    out = tmp_path / "imgs"
    rc = main(["infer", "pixart-alpha", "--weights", "tiny", "--prompt", "a cat", "--out", str(out),
               "--set", "clean_caption=true", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --set clean_caption=true")
    assert "sensitivity[captions]" in err[0] and not out.exists()


def test_family_default_without_the_packages_warns_once_and_is_recorded(without_packages, capsys):
    from sensitivity.evaluation.protocol import protocol_generation_overrides
    from sensitivity.zoo import get_family

    fam = get_family("pixart-alpha")
    assert fam.defaults.extra["clean_caption"] is True
    over = protocol_generation_overrides(fam)
    assert over["extra"] == {"clean_caption": False}  # the protocol (and its signature) say what is done
    protocol_generation_overrides(fam)
    captions.warn_if_uncleaned({"clean_caption": True})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: pixart-alpha: the default clean_caption=true is off")
    assert "beautifulsoup4 and ftfy" in err[0]
    # an explicit false needs nothing and changes nothing
    assert protocol_generation_overrides(fam, settings={"clean_caption": False})["extra"] == {"clean_caption": False}


def test_with_the_packages_nothing_changes(with_packages, capsys):
    from sensitivity.evaluation.protocol import protocol_generation_overrides
    from sensitivity.zoo import get_family

    assert "extra" not in protocol_generation_overrides(get_family("pixart-alpha"))
    captions.check_clean_caption({"clean_caption": True})
    captions.warn_if_uncleaned({"clean_caption": True})
    assert capsys.readouterr().err == ""


def test_the_python_api_call_warns_once(without_packages, capsys):
    from sensitivity.zoo.base import GenerationSettings
    from sensitivity.zoo.diffusers_family import text_settings_kwargs

    s = GenerationSettings(steps=2, guidance=4.5, extra={"clean_caption": True})
    for _ in range(3):
        assert text_settings_kwargs(s)["clean_caption"] is True
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diffusers skips the cleaning" in err[0]


@pytest.mark.skipif(not HAS_CAPTIONS, reason="beautifulsoup4/ftfy not installed: pip install 'sensitivity[captions]'")
def test_the_captions_extra_makes_diffusers_clean():
    from diffusers import PixArtAlphaPipeline

    assert captions.missing_caption_packages() == []

    class Bare(PixArtAlphaPipeline):  # only the text preprocessing, no components
        def __init__(self):
            pass

    raw = "A <b>red</b> fox&amp;friends, see https://example.com/x.jpg"
    cleaned = Bare()._text_preprocessing(raw, clean_caption=True)[0]
    plain = Bare()._text_preprocessing(raw, clean_caption=False)[0]
    assert plain == raw.lower().strip()
    assert "<b>" not in cleaned and "https" not in cleaned and "red" in cleaned and cleaned != plain
